// The side-by-side page. Every prompt, completion and summary value goes into the page
// with textContent, never innerHTML: model output is shown as text and cannot run.
'use strict';

const $ = (id) => document.getElementById(id);
let annotator = '';
let current = null;  // the pair on screen: {item, ...}
let busy = false;

function show(section) {
  for (const id of ['login', 'pair', 'done', 'summary']) $(id).hidden = id !== section;
}

function fail(message) {
  $('error').textContent = message;
  $('error').hidden = false;
}

async function call(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  return {status: response.status, body};
}

function renderPrompt(prompt) {
  const box = $('prompt');
  box.replaceChildren();
  if (typeof prompt === 'string') {
    box.textContent = prompt;
    return;
  }
  for (const message of prompt) {  // a conversation: one block per message
    const div = document.createElement('div');
    div.className = 'message';
    const role = document.createElement('span');
    role.className = 'role';
    role.textContent = message.role;
    div.append(role, document.createTextNode(message.content));
    box.append(div);
  }
}

function render(next) {
  $('progress').textContent = `${next.progress.judged} of ${next.progress.total} judged`;
  if (next.done) {
    current = null;
    $('pair').dataset.item = '';
    $('done-text').textContent =
        `Thank you, ${annotator}: you have judged all ${next.progress.total} items.`;
    show('done');
    return;
  }
  current = next;
  renderPrompt(next.prompt);
  $('left').textContent = next.left;
  $('right').textContent = next.right;
  $('reason').value = '';
  $('pair').dataset.item = String(next.item);
  show('pair');
}

async function start() {
  const name = $('name').value.trim();
  if (!name) { fail('Enter your name first.'); return; }
  annotator = name;
  localStorage.setItem('annotator', name);
  const {status, body} = await call('/api/next?annotator=' + encodeURIComponent(name));
  if (status !== 200) { fail(body && body.error ? body.error : `Error ${status}`); return; }
  $('error').hidden = true;
  render(body);
}

async function choose(choice) {
  if (!current || busy) return;
  busy = true;
  try {
    const {status, body} = await call('/api/judge', {
      method: 'POST', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({annotator, item: current.item, choice,
                            reason: $('reason').value}),
    });
    if (status === 409) {  // judged already (another tab): move on
      const next = await call('/api/next?annotator=' + encodeURIComponent(annotator));
      render(next.body);
    } else if (status !== 200) {
      fail(body && body.error ? body.error : `Error ${status}`);
    } else {
      $('error').hidden = true;
      render(body);
    }
  } finally {
    busy = false;
  }
}

function pct(rate) {
  if (rate.rate === null) return 'n/a';
  const [lo, hi] = rate.ci95;
  return `${rate.rate.toFixed(3)} (95% CI ${lo.toFixed(3)} to ${hi.toFixed(3)})`;
}

async function summary() {
  show('summary');
  document.querySelector('h1').textContent = 'Summary';
  $('nav').textContent = 'Judge';
  $('nav').href = '/';
  const {status, body} = await call('/api/summary');
  if (status !== 200) { fail(body && body.error ? body.error : `Error ${status}`); return; }
  const s = body, w = s.a_vs_b, p = s.position, g = s.agreement;
  const rows = [
    ['Items', String(s.items)],
    ['Judgements', String(s.judgements)],
    ['Annotators', Object.entries(s.annotators).map(([n, c]) => `${n} (${c})`).join(', ')],
    ['A wins / B wins / ties / both bad',
     `${w.a_wins} / ${w.b_wins} / ${w.ties} / ${w.both_bad}`],
    ['Win rate of A', pct(w.win_rate_a)],
    ['', w.method],
    ['Left side chosen', pct(p.left_win_rate)],
    ['', p.method],
    ['Agreement', g.kappa === null ? `n/a${g.note ? ': ' + g.note : ''}`
        : `${g.statistic === 'cohen' ? "Cohen's" : "Fleiss'"} kappa ${g.kappa.toFixed(3)} ` +
          `over ${g.items} items, ${g.annotators.length} annotators`],
  ];
  const tbody = $('summary-rows');
  tbody.replaceChildren();
  for (const [key, value] of rows) {
    const tr = document.createElement('tr');
    for (const text of [key, value]) {
      const td = document.createElement('td');
      td.textContent = text;
      tr.append(td);
    }
    tbody.append(tr);
  }
  tbody.dataset.ready = '1';
}

document.addEventListener('DOMContentLoaded', () => {
  if (location.pathname === '/summary') { summary(); return; }
  $('name').value = localStorage.getItem('annotator') || '';
  $('start').addEventListener('click', start);
  $('name').addEventListener('keydown', (e) => { if (e.key === 'Enter') start(); });
  for (const button of document.querySelectorAll('[data-choice]')) {
    button.addEventListener('click', () => choose(button.dataset.choice));
  }
  show('login');
});
