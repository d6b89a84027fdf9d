// The report's attention explorer: one attention row of the embedded maps, drawn over its image.
// The data (script#explorer-data) is packed by analysis/explorer.py, whose docstring gives the
// encoding: per image and tier a base64 zlib stream of uint8 mu-law codes of rows over the P patches
// (codes of at most data.packed_levels two to a byte, high nibble first).
// Plain JavaScript, no library, no network: the page works from the file.
(function () {
  'use strict';
  const root = document.getElementById('explorer');
  const data = JSON.parse(document.getElementById('explorer-data').textContent);
  const $ = (id) => document.getElementById(id);
  const ui = {
    panel: $('explorer-ui'), image: $('explorer-image'), layer: $('explorer-layer'), head: $('explorer-head'),
    cls: $('explorer-cls'), canvas: $('explorer-canvas'), legend: $('explorer-legend'),
    legendMax: $('explorer-legend-max'), readout: $('explorer-readout'),
  };
  const [gridH, gridW] = data.grid;
  const [patchH, patchW] = data.patch;
  const P = gridH * gridW, Q = 1 + P, L = data.layers, H = data.heads;
  // Pixels per image pixel: the canvas is at most about 448 px wide.
  const scale = Math.max(1, Math.floor(448 / Math.max(gridH * patchH, gridW * patchW)));
  const cellH = patchH * scale, cellW = patchW * scale;
  ui.canvas.width = gridW * cellW;
  ui.canvas.height = gridH * cellH;

  // Decoding table of each tier: code -> x = a / max(a) (the inverse of explorer.quantise).
  const tables = {};
  for (const [tier, levels] of Object.entries(data.levels)) {
    tables[tier] = Float64Array.from({length: 256}, (_, q) => Math.expm1(q / levels * Math.log1p(data.mu)) / data.mu);
  }

  const state = {image: 0, layer: 0, head: 'mean', query: 0};  // query 0 = CLS, 1 + p = patch p
  const loaded = new Map();  // image -> Promise of {codes: {tier: Uint8Array}, picture: HTMLImageElement|null}

  async function inflate(base64, levels) {  // in memory: no fetch, not even of a data: URL
    const raw = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
    const stream = new Blob([raw]).stream().pipeThrough(new DecompressionStream('deflate'));
    const bytes = new Uint8Array(await new Response(stream).arrayBuffer());
    if (levels > data.packed_levels) return bytes;
    const codes = new Uint8Array(2 * bytes.length);
    bytes.forEach((b, i) => { codes[2 * i] = b >> 4; codes[2 * i + 1] = b & 15; });
    return codes;
  }

  function picture(src) {
    if (!src) return Promise.resolve(null);
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error('explorer: an image crop did not decode'));
      img.src = src;
    });
  }

  function load(k) {
    if (!loaded.has(k)) {
      const entry = data.images[k];
      const tiers = Object.keys(data.levels);
      loaded.set(k, Promise.all([picture(entry.src), ...tiers.map((t) => inflate(entry[t], data.levels[t]))]).then(
        ([pic, ...arrays]) => ({picture: pic, codes: Object.fromEntries(tiers.map((t, i) => [t, arrays[i]]))})));
    }
    return loaded.get(k);
  }

  // The shown row: [tier, offset] into that tier's codes.
  function where() {
    const {layer, head, query} = state;
    if (layer === 'rollout') return ['rollout', query * P];
    if (head === 'mean') return ['mean', (layer * Q + query) * P];
    if (query === 0) return ['cls', (layer * H + head) * P];
    return ['heads', ((layer * H + head) * P + query - 1) * P];
  }

  // Shares of the row's patch attention and the numbers of analysis.maps.attention_metrics.
  function numbers(x, fg) {
    let total = 0, top = 0;
    for (let i = 0; i < P; i++) {
      total += x[i];
      if (x[i] > x[top]) top = i;
    }
    const share = Array.from(x, (v) => (total > 0 ? v / total : 0));
    let entropy = 0, fgRatio = 0;
    for (let i = 0; i < P; i++) {
      if (share[i] > 0) entropy -= share[i] * Math.log(share[i]);
      if (fg) fgRatio += share[i] * fg[i];
    }
    return {share, top, entropy: entropy / Math.log(P), fg_ratio: fg ? fgRatio : null};
  }

  function colour(v) {  // v in [0, 1] -> 'rgb(...)' on the report's colour map
    const stops = data.colours, t = Math.min(Math.max(v, 0), 1) * (stops.length - 1);
    const i = Math.min(Math.floor(t), stops.length - 2), f = t - i;
    const c = stops[i].map((a, j) => Math.round(a + f * (stops[i + 1][j] - a)));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }

  function patchName(p) {
    return `row ${Math.floor(p / gridW) + 1}, column ${(p % gridW) + 1}`;
  }

  function line(parent, label, metric, value, text) {
    const item = document.createElement('li');
    item.append(label + ' ');
    const span = document.createElement('span');
    span.dataset.metric = metric;
    if (value !== null) span.dataset.value = String(value);
    span.textContent = text;
    item.append(span);
    parent.append(item);
    return item;
  }

  function layerFlags(entry) {  // patch indices flagged as high-norm at the shown layer (none for rollout)
    return state.layer === 'rollout' || !entry.flagged ? [] : entry.flagged[state.layer];
  }

  function describe(entry, n) {
    const {layer, head, query} = state;
    const heading = document.createElement('p');
    heading.className = 'explorer-what';
    const q = document.createElement('span');
    q.dataset.query = query === 0 ? 'cls' : String(query - 1);
    q.textContent = query === 0 ? 'the CLS token' : `patch ${patchName(query - 1)}`;
    const layerName = layer === 'rollout' ? 'rollout' : `layer ${layer + 1}`;
    const headName = layer === 'rollout' || head === 'mean' ? 'head mean' : `head ${head + 1}`;
    heading.append(`${entry.title} \u00b7 ${layerName} \u00b7 ${headName} \u00b7 query: `, q);
    const list = document.createElement('ul');
    if (n.fg_ratio === null) {
      line(list, 'fg_ratio:', 'fg_ratio', null, 'no flower mask for this image');
    } else {
      line(list, 'fg_ratio (share on the flower):', 'fg_ratio', n.fg_ratio, n.fg_ratio.toFixed(3));
    }
    line(list, 'entropy (/ log P):', 'entropy', n.entropy, n.entropy.toFixed(3));
    const top = line(list, 'most attended patch:', 'top', n.top, patchName(n.top));
    const onFlower = entry.fg ? (entry.fg[n.top] >= 0.5 ? ', on the flower' : ', off the flower') : '';
    top.append(` (share ${n.share[n.top].toFixed(3)}${onFlower})`);
    if (entry.flagged && layer !== 'rollout') {
      const flagged = layerFlags(entry);
      const share = flagged.reduce((sum, p) => sum + n.share[p], 0);
      line(list, 'high-norm tokens (dashed):', 'flagged', flagged.length,
           flagged.length ? `${flagged.map(patchName).join(', ')}; share ${share.toFixed(3)}` : 'none at this layer');
    }
    const note = document.createElement('p');
    note.className = 'explorer-why';
    if (layer !== 'rollout' && head === 'mean' && query > 0 && !data.levels.heads) {
      note.textContent = 'Single heads are stored for the CLS query only in this report (size budget); '
                         + 'patch queries show the head mean.';
    }
    ui.readout.replaceChildren(heading, list, note);
  }

  function legend(maxShare) {
    const ctx = ui.legend.getContext('2d');
    for (let i = 0; i < ui.legend.width; i++) {
      ctx.fillStyle = colour(i / (ui.legend.width - 1));
      ctx.fillRect(i, 0, 1, ui.legend.height);
    }
    ui.legendMax.textContent = `${maxShare.toFixed(3)} (share of the row's patch attention; `
                               + 'colours scaled to the largest)';
  }

  function draw(entry, maps) {
    const [tier, offset] = where();
    const codes = maps.codes[tier].subarray(offset, offset + P);
    const x = Array.from(codes, (c) => tables[tier][c]);
    const n = numbers(x, entry.fg);
    const peak = Math.max(...x) || 1;
    const ctx = ui.canvas.getContext('2d');
    ctx.imageSmoothingEnabled = false;
    ctx.globalAlpha = 1;
    if (maps.picture) ctx.drawImage(maps.picture, 0, 0, ui.canvas.width, ui.canvas.height);
    else { ctx.fillStyle = '#000'; ctx.fillRect(0, 0, ui.canvas.width, ui.canvas.height); }
    ctx.globalAlpha = maps.picture ? data.alpha : 1;
    for (let p = 0; p < P; p++) {
      ctx.fillStyle = colour(x[p] / peak);
      ctx.fillRect((p % gridW) * cellW, Math.floor(p / gridW) * cellH, cellW, cellH);
    }
    ctx.globalAlpha = 1;
    if (state.query > 0) {  // the clicked patch, outlined
      const p = state.query - 1, left = (p % gridW) * cellW, top = Math.floor(p / gridW) * cellH;
      ctx.lineWidth = 3;
      ctx.strokeStyle = '#00e5ff';
      ctx.strokeRect(left + 1.5, top + 1.5, cellW - 3, cellH - 3);
    }
    const flagged = layerFlags(entry);
    ctx.setLineDash([4, 3]);  // the high-norm (flagged) tokens of this layer, dashed
    ctx.lineWidth = 2;
    ctx.strokeStyle = '#ff2bd6';
    for (const p of flagged) {
      ctx.strokeRect((p % gridW) * cellW + 1, Math.floor(p / gridW) * cellH + 1, cellW - 2, cellH - 2);
    }
    ctx.setLineDash([]);
    legend(n.share[n.top]);
    describe(entry, n);
    root.dataset.draws = String(Number(root.dataset.draws || 0) + 1);
  }

  // Per-head rows of patch queries may be left out (size budget); rollout has no heads.
  function syncHeads() {
    const noHeads = state.layer === 'rollout' || (state.query > 0 && !data.levels.heads);
    for (const option of ui.head.options) option.disabled = noHeads && option.value !== 'mean';
    if (noHeads) { state.head = 'mean'; ui.head.value = 'mean'; }
  }

  async function show() {
    syncHeads();
    const k = state.image;
    const maps = await load(k);
    if (k === state.image) draw(data.images[k], maps);  // else the user moved on; that call draws
  }

  function readControls() {
    state.image = Number(ui.image.value);
    state.layer = ui.layer.value === 'rollout' ? 'rollout' : Number(ui.layer.value);
    state.head = ui.head.value === 'mean' ? 'mean' : Number(ui.head.value);
    show();
  }

  function step(select, delta) {  // to the next enabled option, as a change by hand would
    const options = Array.from(select.options);
    for (let i = select.selectedIndex + delta; i >= 0 && i < options.length; i += delta) {
      if (!options[i].disabled) { select.selectedIndex = i; readControls(); return; }
    }
  }

  for (const select of [ui.image, ui.layer, ui.head]) select.addEventListener('change', readControls);
  ui.cls.addEventListener('click', () => { state.query = 0; show(); });
  ui.canvas.addEventListener('click', (event) => {
    const box = ui.canvas.getBoundingClientRect();
    const col = Math.floor((event.clientX - box.left) * ui.canvas.width / box.width / cellW);
    const row = Math.floor((event.clientY - box.top) * ui.canvas.height / box.height / cellH);
    if (row < 0 || row >= gridH || col < 0 || col >= gridW) return;
    const query = 1 + row * gridW + col;
    state.query = state.query === query ? 0 : query;  // a second click goes back to CLS
    show();
  });
  root.addEventListener('keydown', (event) => {
    if (event.target.tagName === 'SELECT' || event.altKey || event.ctrlKey || event.metaKey) return;
    const moves = {ArrowUp: [ui.layer, -1], ArrowDown: [ui.layer, 1],
                   ArrowLeft: [ui.head, -1], ArrowRight: [ui.head, 1]};
    if (event.key in moves) step(...moves[event.key]);
    else if (event.key === 'Escape') { state.query = 0; show(); }
    else return;
    event.preventDefault();
  });

  ui.panel.hidden = false;
  if (typeof DecompressionStream === 'undefined') {
    ui.readout.textContent = 'This browser cannot inflate the embedded maps (no DecompressionStream); '
                             + 'open the report in a current browser.';
  } else {
    readControls();
  }
})();
