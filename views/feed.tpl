% rebase('base.tpl', title=title, page='feed', poll_timeout=poll_timeout)
<main class="feed">
  <h1 class="visually-hidden">Feed stream</h1>
  <section id="stream" class="stream" aria-label="Live entries">
    <div class="queue">
      <button id="pace" class="pace" type="button" data-paused="false" title="Pause or resume the stream">Live</button>
      <span id="waiting" class="waiting">0 waiting</span>
      <span class="hint">Hover over the stream, or press Live, to pause it.</span>
    </div>
    <ol id="entries" aria-live="off"></ol>
  </section>
  <aside class="sources" aria-label="Feeds">
    <h2>Feeds</h2>
    <ul id="feeds"></ul>
  </aside>
</main>
