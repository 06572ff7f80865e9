// The page of `sae-lens show`: draws the shaded text from the JSON data block, and fills the panel on hover or focus.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("data").textContent);
  const tokens = data.tokens, rows = data.rows, n = tokens.length, C = data.context;
  const text = document.getElementById("text"), panel = document.getElementById("panel");
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" };
  // Newlines and tabs are drawn as symbols so that every token keeps a visible, hoverable box.
  const shown = (s) => s.replace(/[&<>"]/g, (c) => ESCAPES[c]).replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  const num = (x) => (Number.isInteger(x) ? String(x) : x.toPrecision(4));
  // The features behind the panel: most of a large page's bytes, parsed once the text is drawn (or on first need).
  let details = null;
  const detailsOf = (r) => {
    if (details === null) details = JSON.parse(document.getElementById("details").textContent);
    return details[r];
  };
  const position = new Int32Array(n);
  data.order.forEach((i, p) => { position[i] = p; });

  function cells(i) {
    let s = "";
    for (const row of rows) s += '<span class="c b' + row.bins[i] + '">' + (shown(tokens[i]) || "&nbsp;") + "</span>";
    return s;
  }

  // One string and one innerHTML: at 20,000 tokens this is several times faster than building nodes one by one.
  const parts = [];
  let doc = -1;
  for (const i of data.order) {
    if (data.mode === "tokens" && data.docs[i] !== doc) {
      if (doc >= 0) parts.push("</p>");
      parts.push("<p>");
      doc = data.docs[i];
    }
    parts.push('<span class="t" id="t' + i + '" data-i="' + i + '" role="option">' + cells(i) + "</span>");
  }
  if (doc >= 0) parts.push("</p>");
  text.innerHTML = parts.join("");

  function context(i, width) {
    let s = "";
    for (let j = Math.max(0, i - width); j <= Math.min(n - 1, i + width); j++) {
      if (data.docs[j] !== data.docs[i]) continue;
      s += j === i ? "<mark>" + shown(tokens[j]) + "</mark>" : shown(tokens[j]);
    }
    return s;
  }

  function go(i) {
    return '<button type="button" class="go" data-go="' + i + '">';
  }

  function describeRow(row, r, i) {
    const more = detailsOf(r);
    const start = more.offsets[i], end = more.offsets[i + 1];
    let s = '<section class="row" data-row="' + r + '"><h3><span class="rowmark">' + (r + 1) + "</span> " +
      shown(row.name) + "</h3>";
    s += '<p class="stats">' + shown(row.measure) + ' <b class="value">' + num(row.values[i]) + "</b>";
    if (row.measure !== "L0") s += ' &middot; L0 <b class="l0">' + row.l0[i] + "</b>";
    s += "</p>";
    if (end === start) return s + '<p class="none">no active features</p></section>';
    s += '<table class="feats"><thead><tr><th>feature</th><th>activation</th><th>its top ' +
      (data.mode === "inputs" ? "inputs" : "tokens") + " in this text</th></tr></thead><tbody>";
    for (let p = start; p < end; p++) {
      const f = more.features[p];
      const tops = (more.top[f] || []).map(([j, a]) => go(j) + context(j, Math.min(C, 3)) + " <b>" + num(a) + "</b></button>");
      s += '<tr data-feature="' + f + '"><td class="feat">' + f + '</td><td class="act">' + num(more.acts[p]) +
        '</td><td class="tops">' + tops.join("") + "</td></tr>";
    }
    s += "</tbody></table>";
    if (row.l0[i] > end - start) s += '<p class="more">the ' + (end - start) + " largest of " + row.l0[i] + " features</p>";
    return s + "</section>";
  }

  let current = -1;
  function select(i, scroll) {
    if (i < 0 || i >= n) return;
    if (current >= 0) document.getElementById("t" + current).classList.remove("sel");
    current = i;
    const el = document.getElementById("t" + i);
    el.classList.add("sel");
    text.setAttribute("aria-activedescendant", "t" + i);
    if (scroll) el.scrollIntoView({ block: "nearest" });
    let s = '<p class="where" data-token="' + i + '">' + (data.mode === "inputs" ? "input " : "token ") + i + ": " +
      context(i, C) + "</p>";
    rows.forEach((row, r) => { s += describeRow(row, r, i); });
    panel.innerHTML = s;
    panel.dataset.token = String(i);
  }

  text.addEventListener("mouseover", (e) => {
    const t = e.target.closest(".t");
    if (t) select(Number(t.dataset.i), false);
  });
  text.addEventListener("click", (e) => {
    const t = e.target.closest(".t");
    if (t) { select(Number(t.dataset.i), false); text.focus({ preventScroll: true }); }
  });
  text.addEventListener("focus", () => { if (current < 0) select(data.order[0], true); });
  // Up and down jump a line's worth of tokens (or one input); Home and End go to the ends.
  const STEP = data.mode === "inputs" ? 1 : 12;
  const MOVES = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: STEP, ArrowUp: -STEP, PageDown: 10 * STEP, PageUp: -10 * STEP };
  text.addEventListener("keydown", (e) => {
    const p = current < 0 ? 0 : position[current];
    let next;
    if (e.key in MOVES) next = p + MOVES[e.key];
    else if (e.key === "Home") next = 0;
    else if (e.key === "End") next = n - 1;
    else return;
    e.preventDefault();
    select(data.order[Math.max(0, Math.min(n - 1, next))], true);
  });
  document.addEventListener("click", (e) => {
    const b = e.target.closest("button.go");
    if (b) { select(Number(b.dataset.go), true); text.focus({ preventScroll: true }); }
  });

  let ranked = "";
  rows.forEach((row, r) => {
    for (const [end, title] of [["low", "lowest"], ["high", "highest"]]) {
      ranked += '<div class="rank"><h3><span class="rowmark">' + (r + 1) + "</span> " + title + " " + shown(row.measure) +
        "</h3><ol>";
      for (const i of row.ranked[end]) {
        ranked += "<li>" + go(i) + '<span class="v b' + row.bins[i] + '">' + num(row.values[i]) + "</span> " + context(i, C) +
          "</button></li>";
      }
      ranked += "</ol></div>";
    }
  });
  document.getElementById("ranked").innerHTML = ranked;

  // When the text has been laid out and painted: the time from navigation start (read by the page's benchmark).
  requestAnimationFrame(() => setTimeout(() => {
    document.body.dataset.renderMs = performance.now().toFixed(1);
    setTimeout(() => detailsOf(0), 0);
  }, 0));
})();
