<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}} · longpoll</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/style.css">
</head>
<body class="page-{{page}}" data-poll-timeout="{{poll_timeout}}">
<header class="bar">
  <a class="brand" href="/"><span class="logo" aria-hidden="true"></span>longpoll</a>
  <nav>
    <a href="/"{{!' aria-current="page"' if page == 'chat' else ''}}>Chat</a>
    <a href="/feed"{{!' aria-current="page"' if page == 'feed' else ''}}>Feed stream</a>
  </nav>
  <span id="state" class="state" data-state="connecting" role="status">Connecting…</span>
</header>
{{!base}}
<script src="/static/poll.js"></script>
<script src="/static/{{page}}.js"></script>
</body>
</html>
