#!/usr/bin/env node
// A Crux service in Node with the stock @grpc/grpc-js client: registers with its node's agent,
// heartbeats, looks another service up, watches it, and deregisters cleanly on SIGTERM/SIGINT.
//
//   npm install
//   node service.js --socket /run/crux/reeve.sock --api hello1 --inst hello1_1 \
//       --addr 127.0.0.1:8080 --watch galumph2 [--proto ../../proto/proto]
'use strict';
const { client, call, DEFAULT_PROTO } = require('./reeve');

function args() {
  const a = { socket: '/run/crux/reeve.sock', proto: DEFAULT_PROTO, api: 'hello1',
    inst: 'hello1_1', addr: '127.0.0.1:8080', watch: '' };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) a[argv[i].replace(/^--/, '')] = argv[i + 1];
  return a;
}

async function main() {
  const a = args();
  const c = client(a.socket, a.proto);
  const reg = await call(c, 'Register', {
    api: a.api, inst: a.inst, addr: a.addr,
    state: 'RUN_STATE_RUNNING', health: 'HEALTH_HEALTHY',
  });
  console.log(`registered ${a.inst} as ${reg.id}`);

  const beat = { id: reg.id, token: reg.token, state: 'RUN_STATE_RUNNING', health: 'HEALTH_HEALTHY' };
  const hb = c.Heartbeat();
  let acked = false;
  hb.on('data', (ack) => {
    if (!acked) console.log(`heartbeat acked: leader ${ack.leader}, steward ${ack.steward}`);
    acked = true;
  });
  hb.on('error', () => {});
  hb.write(beat);
  const timer = setInterval(() => hb.write(beat), Math.max(Number(reg.heartbeat_interval_ms), 100));

  let watch = null;
  if (a.watch) {
    const found = await call(c, 'Lookup', { selector: a.watch, live_only: true });
    console.log(`lookup ${a.watch}: ${JSON.stringify(found.instances.map((i) => i.inst))}`);
    watch = c.Watch({ selector: a.watch });
    watch.on('data', (ev) => console.log(`watch ${a.watch} ${ev.snapshot ? 'snapshot' : 'change'} ` +
      `r${ev.revision}: put ${JSON.stringify(ev.put.map((i) => i.inst))} ` +
      `remove ${JSON.stringify(ev.remove.map((i) => i.inst))}`));
    watch.on('error', () => {});
  }

  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    clearInterval(timer);
    if (watch) watch.cancel();
    hb.end();
    await call(c, 'Deregister', { id: reg.id, token: reg.token });
    console.log(`deregistered ${a.inst}`);
    c.close();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  console.log('serving; SIGTERM deregisters');
}

main().catch((e) => { console.error(e); process.exit(1); });
