#!/usr/bin/env node
// Conformance of the local API with the stock Node @grpc/grpc-js client (issue 24), run by
// agent/tests/local_api.rs against a live two-node flock:
//
//   node conformance.js NODE1_SOCKET NODE2_SOCKET PROTO_DIR
//
// Register on node 1, heartbeat, look up and watch on node 2 (snapshot, then a change),
// deregister; the example service (service.js) registers and deregisters on SIGTERM. Prints
// "conformance: ok" at the end; any failure exits non-zero.
'use strict';
const path = require('path');
const { spawn } = require('child_process');
const { client, call } = require('./reeve');

const DEADLINE_MS = 20000;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitFor(what, check) {
  const end = Date.now() + DEADLINE_MS;
  let last;
  while (Date.now() < end) {
    last = await check();
    if (last) return last;
    await sleep(20);
  }
  throw new Error(`timed out waiting for ${what} (last: ${JSON.stringify(last)})`);
}

// Events of a server stream, awaited one predicate at a time.
function events(stream) {
  const queue = [];
  let wake = null;
  stream.on('data', (ev) => { queue.push(ev); if (wake) wake(); });
  stream.on('error', (e) => { queue.push(e); if (wake) wake(); });
  return async (pred, what) => {
    const end = Date.now() + DEADLINE_MS;
    for (;;) {
      while (queue.length) {
        const ev = queue.shift();
        if (ev instanceof Error) throw ev;
        if (pred(ev)) return ev;
      }
      if (Date.now() >= end) throw new Error(`watch: no ${what}`);
      await new Promise((r) => { wake = r; setTimeout(r, end - Date.now()); });
      wake = null;
    }
  };
}

async function main() {
  const [s1, s2, proto] = process.argv.slice(2);
  console.log(`@grpc/grpc-js ${require('@grpc/grpc-js/package.json').version}, no channel options`);
  const n1 = client(s1, proto);
  const n2 = client(s2, proto);

  const members = await call(n1, 'Members', {});
  console.log(`Members on node 1: ${members.members.length}`);
  if (members.members.length !== 2) throw new Error(JSON.stringify(members));

  const watch = n2.Watch({ selector: 'nodeconf1' });
  const next = events(watch);
  const snap = await next((e) => e.snapshot, 'snapshot');
  console.log(`Watch on node 2: snapshot at r${snap.revision}, ${snap.put.length} instances`);

  const register = (inst) => call(n1, 'Register', {
    api: 'nodeconf1', inst, addr: '127.0.0.1:9', state: 'RUN_STATE_RUNNING', health: 'HEALTH_HEALTHY',
  });
  const reg = await register('nodeconf1_1');
  console.log(`Register on node 1: ${reg.id}, heartbeat every ${reg.heartbeat_interval_ms} ms`);
  const hb = n1.Heartbeat();
  const beat = { id: reg.id, token: reg.token, state: 'RUN_STATE_RUNNING', health: 'HEALTH_HEALTHY' };
  const ack = await new Promise((resolve, reject) => {
    hb.once('data', resolve);
    hb.once('error', reject);
    hb.write(beat);
  });
  hb.on('error', () => {});
  const timer = setInterval(() => hb.write(beat), Number(reg.heartbeat_interval_ms));
  console.log(`Heartbeat acked: leader ${ack.leader}, steward ${ack.steward}`);

  const t0 = Date.now();
  const found = await waitFor('nodeconf1_1 on node 2', async () =>
    (await call(n2, 'Lookup', { selector: 'nodeconf1' })).instances.find((i) => i.inst === 'nodeconf1_1'));
  console.log(`Lookup on node 2: ${found.inst} at ${found.addr}, ${Date.now() - t0} ms after registering`);

  let ev = await next((e) => e.put.some((i) => i.inst === 'nodeconf1_1'), 'put of nodeconf1_1');
  console.log(`Watch on node 2: change r${ev.revision} puts nodeconf1_1`);
  const reg2 = await register('nodeconf1_2');
  ev = await next((e) => e.put.some((i) => i.inst === 'nodeconf1_2'), 'put of nodeconf1_2');
  console.log(`Watch on node 2: change r${ev.revision} puts nodeconf1_2 (the best instance now)`);

  await call(n1, 'Deregister', { id: reg2.id, token: reg2.token });
  clearInterval(timer);
  hb.end();
  await call(n1, 'Deregister', { id: reg.id, token: reg.token });
  await waitFor('nodeconf1 gone from node 2', async () =>
    (await call(n2, 'Lookup', { selector: 'nodeconf1', live_only: true })).instances.length === 0);
  console.log('Deregister on node 1: nodeconf1 gone from node 2');
  watch.cancel();

  // The example service: registers, heartbeats, watches; deregisters on SIGTERM.
  const ex = spawn(process.execPath, [path.join(__dirname, 'service.js'), '--socket', s1,
    '--proto', proto, '--api', 'nodeex1', '--inst', 'nodeex1_1', '--addr', '127.0.0.1:10',
    '--watch', 'nodeconf1'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  ex.stdout.on('data', (d) => { out += d; });
  ex.stderr.on('data', (d) => { out += d; });
  const exited = new Promise((r) => ex.on('exit', (code) => r(code)));
  try {
    await waitFor('service.js serving', () => out.includes('serving'));
    await waitFor('nodeex1_1 on node 2', async () =>
      (await call(n2, 'Lookup', { selector: 'nodeex1', live_only: true })).instances.length > 0);
    ex.kill('SIGTERM');
    const code = await Promise.race([exited, sleep(DEADLINE_MS).then(() => 'timeout')]);
    if (code !== 0 || !out.includes('deregistered nodeex1_1')) {
      throw new Error(`service.js: exit ${code}\n${out}`);
    }
    await waitFor('nodeex1 gone from node 2', async () =>
      (await call(n2, 'Lookup', { selector: 'nodeex1', live_only: true })).instances.length === 0);
    console.log('examples/node/service.js: registered, heartbeated, deregistered on SIGTERM');
  } finally {
    if (ex.exitCode === null) ex.kill('SIGKILL');
  }

  n1.close();
  n2.close();
  console.log('conformance: ok');
}

main().then(() => process.exit(0), (e) => { console.error(e); process.exit(1); });

