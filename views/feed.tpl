% rebase('base.tpl', title=title, page='feed')
<main class="feed">
  <section id="stream" class="stream" aria-label="Live entries">
    <div class="queue">
      <span id="pace" class="pace" data-paused="false">Live</span>
      <span id="waiting" class="waiting">0 waiting</span>
      <span class="hint">Hover over the stream to pause it.</span>
    </div>
    <ol id="entries" aria-live="off"></ol>
  </section>
  <aside class="sources" aria-label="Feeds">
    <h2>Feeds</h2>
    <ul id="feeds"></ul>
  </aside>
</main>
