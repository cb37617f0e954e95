// The virtual board's Node process (started by hil/virtual.py; not meant to be run by hand).
//
//   node main.mjs --repl-fd N --han-fd N --wan-fd N --fs DIR --flash FILE --entry MICROPYTHON_MJS
//                 [--wan 0|1] [--clock UNIX_S] [--heapsize BYTES] [--seed N]
//
// Main thread: reads the REPL pty master into the shared input ring, runs the rig's control
// channel (JSON lines: requests on stdin, replies and events on stdout), and owns the VM worker
// (worker.mjs): starts it at power-on, terminates it at a rig power-off or when a Ctrl-C is not
// honoured within WATCHDOG_MS (a Python loop that never calls out cannot be interrupted).
// stdin closing (the launcher died) ends the process.
import tty from "node:tty";
import readline from "node:readline";
import { Worker } from "node:worker_threads";
import { SLOT, NSLOTS, CLK_OFF, RING_OFF, RING_SIZE, SAB_SIZE } from "./shared.mjs";

const WATCHDOG_MS = 1000;

function parseArgs(argv) {
  const a = {};
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith("--")) throw new Error(`bad argument ${argv[i]}`);
    a[argv[i].slice(2)] = argv[i + 1];
  }
  for (const k of ["repl-fd", "han-fd", "wan-fd", "fs", "flash", "entry"]) {
    if (a[k] === undefined) throw new Error(`missing --${k}`);
  }
  return a;
}

const args = parseArgs(process.argv.slice(2));
const replFd = Number(args["repl-fd"]);
const hanFd = Number(args["han-fd"]);
const wanFd = Number(args["wan-fd"]);

const sab = new SharedArrayBuffer(SAB_SIZE);
const ctl = new Int32Array(sab, 0, NSLOTS);
const clk = new BigInt64Array(sab, CLK_OFF, 4);
const ring = new Uint8Array(sab, RING_OFF, RING_SIZE);
const MASK = RING_SIZE - 1;
ctl[SLOT.CUT] = -1;
ctl[SLOT.RELAY] = -1;
ctl[SLOT.WAN] = args.wan === "1" ? 1 : 0;
ctl[SLOT.SEED] = Number(args.seed || 0);
if (args.clock !== undefined) clk[0] = BigInt(Math.round(Number(args.clock) * 1000)) - BigInt(Date.now());

function send(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

// ------------------------------------------------------------------------------ the worker
let worker = null;
let workerGen = 0;

function startWorker(kind, wasRaw = false) {
  const gen = ++workerGen;
  Atomics.store(ctl, SLOT.POWERED, 1);
  Atomics.store(ctl, SLOT.BUSY, 1);
  const w = new Worker(new URL("./worker.mjs", import.meta.url), {
    workerData: {
      sab, replFd, hanFd, wanFd, kind, wasRaw,
      fsDir: args.fs, flashPath: args.flash, entry: args.entry,
      heapsize: Number(args.heapsize || 1024 * 1024),
    },
    stdout: false, stderr: false,
  });
  worker = w;
  w.on("message", (m) => {
    if (gen !== workerGen) return;
    if (m.type === "ready") send({ event: "ready", kind });
    else if (m.type === "poweroff") {
      Atomics.store(ctl, SLOT.POWERED, 0);
      send({ event: "poweroff", reason: "flash cut" });
      w.terminate();
      if (worker === w) worker = null;
    } else if (m.type === "log") process.stderr.write(`vboard: ${m.msg}\n`);
  });
  w.on("error", (e) => {
    if (gen !== workerGen) return;
    process.stderr.write(`vboard: VM worker crashed: ${e && e.stack || e}\n`);
    Atomics.store(ctl, SLOT.POWERED, 0);
    send({ event: "crash", error: String(e && e.message || e) });
    if (worker === w) worker = null;
  });
}

async function stopWorker() {
  const w = worker;
  worker = null;
  workerGen++;
  Atomics.store(ctl, SLOT.POWERED, 0);
  Atomics.store(ctl, SLOT.BUSY, 0);
  if (w) await w.terminate();
}

// ------------------------------------------------------------------------------ REPL input
const inQueue = [];   // chunks not yet in the ring (it was full)
let watchdog = null;
const repl = new tty.ReadStream(replFd);

function pump() {
  while (inQueue.length) {
    const chunk = inQueue[0];
    const head = Atomics.load(ctl, SLOT.IN_HEAD);
    const tail = Atomics.load(ctl, SLOT.IN_TAIL);
    const free = RING_SIZE - ((head - tail) | 0);
    if (free <= 0) break;
    const n = Math.min(free, chunk.length);
    for (let i = 0; i < n; i++) ring[(head + i) & MASK] = chunk[i];
    Atomics.store(ctl, SLOT.IN_HEAD, (head + n) | 0);
    Atomics.notify(ctl, SLOT.IN_HEAD);
    if (n === chunk.length) inQueue.shift();
    else inQueue[0] = chunk.subarray(n);
  }
  if (inQueue.length) {
    repl.pause();
    setTimeout(pump, 2);
  } else {
    repl.resume();
  }
}

function armWatchdog() {
  if (!worker || !Atomics.load(ctl, SLOT.BUSY)) return;
  if (watchdog) clearTimeout(watchdog);   // the latest Ctrl-C counts
  const gen = Atomics.load(ctl, SLOT.IDLE_GEN);
  const wgen = workerGen;
  watchdog = setTimeout(async () => {
    watchdog = null;
    if (wgen !== workerGen || !Atomics.load(ctl, SLOT.BUSY)) return;
    if (Atomics.load(ctl, SLOT.IDLE_GEN) !== gen) return;
    // The VM did not come back to the REPL: it is in a loop that never calls out.
    const wasRaw = Atomics.load(ctl, SLOT.RAW) === 1;
    await stopWorker();
    send({ event: "watchdog" });
    startWorker("interrupted", wasRaw);
  }, WATCHDOG_MS);
}

repl.on("data", (chunk) => {
  if (!Atomics.load(ctl, SLOT.POWERED)) return;    // an unpowered board hears nothing
  inQueue.push(chunk);
  pump();
  if (chunk.includes(3)) armWatchdog();
});
repl.on("error", (e) => process.stderr.write(`vboard: REPL pty: ${e.message}\n`));

function clearInput() {
  inQueue.length = 0;
  Atomics.store(ctl, SLOT.IN_TAIL, Atomics.load(ctl, SLOT.IN_HEAD));
}

// ------------------------------------------------------------------------------ control
function clockMs() {
  return ctl[SLOT.FROZEN] ? clk[1] : BigInt(Date.now()) + clk[0];
}

function status() {
  return {
    powered: ctl[SLOT.POWERED] === 1,
    erases: ctl[SLOT.ERASES],
    programs: ctl[SLOT.PROGRAMS],
    torn: ctl[SLOT.TORN],
    cut_after: ctl[SLOT.CUT] < 0 ? null : ctl[SLOT.CUT],
    wan: ctl[SLOT.WAN] === 1,
    relay: ctl[SLOT.RELAY] < 0 ? null : ctl[SLOT.RELAY] === 1,
    buttons_pending: ctl[SLOT.BUTTONS],
    pulses_pending: ctl[SLOT.PULSES],
    clock: Number(clockMs()) / 1000,
    clock_frozen: ctl[SLOT.FROZEN] === 1,
    boots: ctl[SLOT.BOOTS],
    raw_repl: ctl[SLOT.RAW] === 1,
    busy: ctl[SLOT.BUSY] === 1,
  };
}

const ops = {
  status: () => status(),
  set_wan: ({ up }) => { Atomics.store(ctl, SLOT.WAN, up ? 1 : 0); },
  press_button: ({ n = 1 }) => { Atomics.add(ctl, SLOT.BUTTONS, n); },
  add_pulses: ({ n }) => { Atomics.add(ctl, SLOT.PULSES, n); },
  clock_set: ({ t }) => {
    const ms = BigInt(Math.round(t * 1000));
    if (ctl[SLOT.FROZEN]) clk[1] = ms; else clk[0] = ms - BigInt(Date.now());
  },
  clock_advance: ({ s }) => {
    const ms = BigInt(Math.round(s * 1000));
    if (ms < 0n) throw new Error("the clock only moves forward with advance; use clock_set");
    clk[0] += ms; clk[1] += ms; clk[2] += ms;
  },
  clock_freeze: ({ on }) => {
    if (on && !ctl[SLOT.FROZEN]) { clk[1] = clockMs(); Atomics.store(ctl, SLOT.FROZEN, 1); }
    if (!on && ctl[SLOT.FROZEN]) { clk[0] = clk[1] - BigInt(Date.now()); Atomics.store(ctl, SLOT.FROZEN, 0); }
  },
  cut_after: ({ n }) => { Atomics.store(ctl, SLOT.CUT, n === null || n === undefined ? -1 : n); },
  set_seed: ({ seed }) => { Atomics.store(ctl, SLOT.SEED, seed); },
  power_on: () => {
    if (worker) throw new Error("the board is already powered");
    clearInput();
    startWorker("power");
  },
  power_off: async () => { await stopWorker(); clearInput(); },
  reset: async () => { await stopWorker(); clearInput(); startWorker("power"); },
  quit: async () => { await stopWorker(); setImmediate(() => process.exit(0)); },
};

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", async (line) => {
  let req;
  try { req = JSON.parse(line); } catch (e) { send({ ok: false, error: `bad JSON: ${e.message}` }); return; }
  const op = ops[req.op];
  if (!op) { send({ id: req.id, ok: false, error: `unknown op ${req.op}` }); return; }
  try {
    const result = await op(req);
    send({ id: req.id, ok: true, result: result === undefined ? null : result });
  } catch (e) {
    send({ id: req.id, ok: false, error: e.message });
  }
});
rl.on("close", () => process.exit(0));   // the launcher is gone: so is the board

startWorker("power");
