// ==UserScript==
// @name         Pollgate worker
// @namespace    pollgate
// @version      {{VERSION}}
// @description  Serve a Pollgate gateway's jobs from this tab: arena.ai (LMArena) with your own session, or a local OpenAI-compatible server.
// @match        https://arena.ai/*
// @match        https://*.arena.ai/*
// @match        https://lmarena.ai/*
// @match        https://*.lmarena.ai/*
{{GATEWAY_MATCH}}// @grant        GM_getValue
// @grant        GM_setValue
// @grant        GM_xmlhttpRequest
{{CONNECT}}// @connect      arena.ai
// @connect      lmarena.ai
// @connect      localhost
// @connect      127.0.0.1
// @run-at       document-idle
// @noframes
{{UPDATE}}// ==/UserScript==
