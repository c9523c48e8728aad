% rebase('base.tpl', title=title, page='chat', poll_timeout=poll_timeout)
<main class="chat">
  <p id="here" class="here" aria-live="polite" hidden></p>
  <ol id="messages" aria-live="polite" aria-label="Messages"></ol>
  <form id="compose" autocomplete="off">
    <input id="nick" maxlength="32" placeholder="Nick" aria-label="Your nick" spellcheck="false">
    <textarea id="body" rows="1" maxlength="2000" aria-label="Message"
              placeholder="Write a message" title="Enter sends; Shift+Enter starts a new line"></textarea>
    <button type="submit">Send</button>
  </form>
  <p id="notice" class="notice" role="alert" hidden></p>
</main>
