% rebase('base.tpl', title=title, page='chat', poll_timeout=poll_timeout)
<main class="chat">
  <h1 class="visually-hidden">Chat</h1>
  <p id="here" class="here" hidden></p>
  <ol id="messages" aria-label="Messages" tabindex="0"></ol>
  <div id="heard" class="visually-hidden" aria-live="polite"></div>
  <form id="compose" autocomplete="off">
    <input id="nick" maxlength="32" placeholder="Nick" aria-label="Your nick" spellcheck="false">
    <textarea id="body" rows="1" maxlength="2000" aria-label="Message"
              placeholder="Write a message" title="Enter sends; Shift+Enter starts a new line"></textarea>
    <button type="submit">Send</button>
  </form>
  <p id="notice" class="notice" role="alert" hidden></p>
</main>
