// farreid report.html: plain JavaScript, inlined into the page by farreid.evaluation.report_page
'use strict';
const data = JSON.parse(document.getElementById('data').textContent);
const CASES = data.case_order;
const state = {page: 0, size: location.hash === '#all' ? Infinity : 50};
const pct = v => v === null ? '–' : (100 * v).toFixed(1) + '%';
const esc = s => String(s).replace(/[&<>"']/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));
function value(id) { return document.getElementById(id).value; }
function checked(id) { return document.getElementById(id).checked; }
function selected() {
  const c = value('case'), alt = value('alt'), dist = value('dist');
  return data.queries.filter(q => (c === 'all' || q.c === c) && (alt === 'all' || q.ab === alt)
    && (dist === 'all' || q.db === dist) && (!checked('failed') || q.fm !== 1)
    && (!checked('hurt') || (q.apr !== null && q.ap !== null && q.apr < q.ap)));
}
// A thumbnail: [sheet, x, y, width] in a sprite sheet (report/s<sheet>.jpg), drawn as a CSS background.
function thumb(ref, cls, label) {
  return `<div class="${cls}" role="img" aria-label="${label}" style="width:${ref[3]}px;height:${data.tile[0]}px;` +
    `background:url(${data.sheets}/s${ref[0]}.jpg) no-repeat -${ref[1]}px -${ref[2]}px"></div>`;
}
function entry(q) {
  const bars = q.w.map(w => `<div class="bar" title="attention ${w.toFixed(3)}">` +
    `<div style="height:${Math.round(100 * w / q.wmax)}%"></div></div>`).join('');
  const frames = `<div>${thumb(q.s, 'frames', "the scorer's frames")}<div class="bars">${bars}</div></div>`;
  const top = q.top.map((g, r) => `<div class="hit m${g[3] === null ? 'x' : g[3]}">${thumb(g[4], 'tile', 'rank ' + (r + 1))}` +
    `#${r + 1} ${data.anonymized ? '' : 'ID ' + esc(g[1])}<br>d=${g[2].toFixed(3)}</div>`).join('');
  const where = q.view === 'aerial' ? `cam ${q.cam}, ${q.alt} m alt, ${q.dist} m, pitch ${q.pitch}°` : `cam ${q.cam} (ground)`;
  const rr = q.apr === null ? '' : ` / re-ranked <span class="${q.apr < q.ap ? 'hurt' : q.apr > q.ap ? 'helped' : ''}">${pct(q.apr)}</span>`;
  const first = q.fm === null ? 'no true match' : `first match at rank ${q.fm}`;
  return `<div class="query" data-query="${esc(q.q)}" data-case="${q.c}" data-ap="${q.ap === null ? '' : q.ap}">` +
    `<div class="head">${q.c} · <b>${esc(q.q)}</b> · ${data.anonymized ? '' : 'ID ' + esc(q.pid) + ' · '}${where} · ` +
    `${q.n} frames · AP ${pct(q.ap)}${rr} · ${data.anonymized ? '' : first}</div>` +
    `<div class="strip">${frames}</div><div class="top">${top}</div></div>`;
}
function render() {
  const rows = selected();
  const pages = Math.max(1, Math.ceil(rows.length / state.size));
  state.page = Math.min(state.page, pages - 1);
  const shown = state.size === Infinity ? rows : rows.slice(state.page * state.size, (state.page + 1) * state.size);
  document.getElementById('queries').innerHTML = shown.map(entry).join('');
  document.getElementById('count').textContent = `${rows.length} of ${data.queries.length} queries` +
    (state.size === Infinity ? '' : ` · page ${state.page + 1} of ${pages}`);
}
function option(id, values) {
  document.getElementById(id).innerHTML = ['all', ...values].map(v => `<option>${esc(v)}</option>`).join('');
}
data.queries.sort((a, b) => CASES.indexOf(a.c) - CASES.indexOf(b.c) || (a.ap === null) - (b.ap === null)
  || (a.ap ?? 0) - (b.ap ?? 0) || (a.q < b.q ? -1 : a.q > b.q ? 1 : 0));
option('case', CASES); option('alt', data.altitude_bins); option('dist', data.distance_bins);
for (const id of ['case', 'alt', 'dist', 'failed', 'hurt']) {
  document.getElementById(id).addEventListener('change', () => { state.page = 0; render(); });
}
document.getElementById('prev').onclick = () => { state.page = Math.max(0, state.page - 1); render(); };
document.getElementById('next').onclick = () => { state.page += 1; render(); };
render();
