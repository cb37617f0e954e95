// The virtual board's Node process (started by hil/virtual.py; not meant to be run by hand).
//
//   node main.mjs --repl-fd N --han-fd N --wan-fd N --fs DIR --flash FILE --entry MICROPYTHON_MJS
//                 [--wan 0|1] [--clock UNIX_S] [--frozen 0|1] [--clock-survives 0|1]
//                 [--heapsize BYTES] [--seed N]
//
// The board clock: host time plus an offset, or frozen (the rig moves it).  With
// --clock-survives 0 every power-on after a power-off or a flash cut restarts it from
// 2000-01-01T00:00:00Z, as on an ESP32 without a battery-backed RTC (it runs on, or stays
// frozen, from there); a reset (the rig's reset button, machine.reset, a soft reset) keeps it.
//
// Main thread: reads the REPL pty master into the shared input ring, runs the rig's control
// channel (JSON lines: requests on stdin, replies and events on stdout), and owns the VM worker
// (worker.mjs): starts it at power-on, terminates it at a rig power-off or when a Ctrl-C is not
// honoured (a Python loop that never calls out cannot be interrupted): see the watchdog below.
// stdin closing (the launcher died) ends the process.
import tty from "node:tty";
import readline from "node:readline";
import { Worker } from "node:worker_threads";
import { SLOT, NSLOTS, CLK_OFF, RING_OFF, RING_SIZE, SAB_SIZE, KEY_OFF, KEY_SIZE, DISP_OFF,
  PIX_OFF, PIX_SIZE } from "./shared.mjs";

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
const linkFd = args["link-fd"] !== undefined ? Number(args["link-fd"]) : -1;   // the HAN's second port

const sab = new SharedArrayBuffer(SAB_SIZE);
const ctl = new Int32Array(sab, 0, NSLOTS);
const clk = new BigInt64Array(sab, CLK_OFF, 4);
const ring = new Uint8Array(sab, RING_OFF, RING_SIZE);
const MASK = RING_SIZE - 1;
const keyq = new Uint8Array(sab, KEY_OFF, KEY_SIZE);
const disp = new Uint8Array(sab, DISP_OFF, PIX_OFF - DISP_OFF);
const pix = new Uint8Array(sab, PIX_OFF, PIX_SIZE);

// The PPMID's display as the firmware last wrote it: {gen, text, pixels (hex, or null)}.
function readDisplay(pixels) {
  for (let i = 0; i < 100; i++) {
    const g = Atomics.load(ctl, SLOT.DISP_GEN);
    if (g & 1) continue;
    const text = Buffer.from(disp.subarray(0, Atomics.load(ctl, SLOT.DISP_LEN))).toString("utf8");
    const px = pixels && Atomics.load(ctl, SLOT.DISP_PIX) ? Buffer.from(pix).toString("hex") : null;
    if (Atomics.load(ctl, SLOT.DISP_GEN) === g) return { gen: g >> 1, text, pixels: px };
  }
  throw new Error("the display is being written: try again");
}
ctl[SLOT.CUT] = -1;
ctl[SLOT.RELAY] = -1;
ctl[SLOT.WAN] = args.wan === "1" ? 1 : 0;
ctl[SLOT.SEED] = Number(args.seed || 0);
ctl[SLOT.CLOCK_KEEP] = args["clock-survives"] === "0" ? 0 : 1;
if (args.frozen === "1") {
  ctl[SLOT.FROZEN] = 1;
  clk[1] = args.clock !== undefined ? BigInt(Math.round(Number(args.clock) * 1000)) : BigInt(Date.now());
} else if (args.clock !== undefined) {
  clk[0] = BigInt(Math.round(Number(args.clock) * 1000)) - BigInt(Date.now());
}

// 2000-01-01T00:00:00Z: where an RTC without a battery starts after a power cut.
const LOST_CLOCK_MS = 946684800000n;

function setClockMs(ms) {
  if (ctl[SLOT.FROZEN]) clk[1] = ms; else clk[0] = ms - BigInt(Date.now());
}

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
      sab, replFd, hanFd, wanFd, linkFd, kind, wasRaw,
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

// The watchdog.  It follows the ring position of the latest Ctrl-C byte (IN_HEAD counts bytes,
// so byte k of the input stream sits at ring position k, chunks still in inQueue included) and
// looks every WATCHDOG_MS until the VM has taken that byte (IN_TAIL past it).  It restarts the
// VM only when two looks a period apart both find it busy, on the same run (IDLE_GEN) and not
// reading input (IN_TAIL): a loop that never calls out.  It does not matter when the Ctrl-C
// arrives: if the VM has not yet started the code it was sent (a loaded machine), the watchdog
// keeps looking instead of giving up, and a slow VM is never restarted on one look.
let watch = null;   // { pos, gen, last: look(), timer }

function look() {
  return {
    busy: Atomics.load(ctl, SLOT.BUSY),
    idle: Atomics.load(ctl, SLOT.IDLE_GEN),
    tail: Atomics.load(ctl, SLOT.IN_TAIL),
  };
}

function taken(pos) {
  return ((Atomics.load(ctl, SLOT.IN_TAIL) - pos) | 0) > 0;
}

function armWatchdog(pos) {
  if (!worker) return;
  // An earlier Ctrl-C the VM has not taken either: follow the latest, the clock runs on.
  if (watch && watch.gen === workerGen && !taken(watch.pos)) { watch.pos = pos; return; }
  if (watch) clearTimeout(watch.timer);
  watch = { pos, gen: workerGen, last: look(), timer: null };
  watch.timer = setTimeout(checkWatchdog, WATCHDOG_MS);
}

async function checkWatchdog() {
  const w = watch;
  if (!w) return;
  if (w.gen !== workerGen || !worker || taken(w.pos)) { watch = null; return; }
  const prev = w.last, now = look();
  w.last = now;
  if (!(prev.busy && now.busy && prev.idle === now.idle && prev.tail === now.tail)) {
    w.timer = setTimeout(checkWatchdog, WATCHDOG_MS);   // not stuck (yet): look again
    return;
  }
  watch = null;
  // The VM did not come back to the REPL: it is in a loop that never calls out.
  const wasRaw = Atomics.load(ctl, SLOT.RAW) === 1;
  await stopWorker();
  dropCtrlC(w.pos);
  send({ event: "watchdog" });
  startWorker("interrupted", wasRaw);
}

// The restart honours the Ctrl-C: take it, and any before it, out of the input (the worker is
// gone, nobody reads the ring), or the new VM would get one while it starts up and crash with a
// KeyboardInterrupt.  A board's UART does not buffer Ctrl-C either; other bytes typed stay for
// the REPL.
function dropCtrlC(pos) {
  const head = Atomics.load(ctl, SLOT.IN_HEAD);
  const tail = Atomics.load(ctl, SLOT.IN_TAIL);
  if (((pos - tail) | 0) < 0) return;                      // already gone (input cleared)
  if (head !== tail) {                                      // in the ring: compact towards head
    const end = ((head - pos) | 0) > 0 ? pos : (head - 1) | 0;
    let dst = end;
    for (let p = end; ; p = (p - 1) | 0) {
      const b = ring[p & MASK];
      if (b !== 3) { ring[dst & MASK] = b; dst = (dst - 1) | 0; }
      if (p === tail) break;
    }
    Atomics.store(ctl, SLOT.IN_TAIL, (dst + 1) | 0);
  }
  if (((pos - head) | 0) >= 0 && inQueue.length) {          // still queued
    const q = Buffer.concat(inQueue);
    const k = ((pos - head) | 0) + 1;
    inQueue.length = 0;
    inQueue.push(Buffer.concat([q.subarray(0, k).filter((b) => b !== 3), q.subarray(k)]));
  }
}

repl.on("data", (chunk) => {
  if (!Atomics.load(ctl, SLOT.POWERED)) return;    // an unpowered board hears nothing
  let base = Atomics.load(ctl, SLOT.IN_HEAD);       // stream position of chunk[0]
  for (const c of inQueue) base = (base + c.length) | 0;
  inQueue.push(chunk);
  pump();
  const i = chunk.lastIndexOf(3);
  if (i >= 0) armWatchdog((base + i) | 0);
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
    clock_survives: ctl[SLOT.CLOCK_KEEP] === 1,
    boots: ctl[SLOT.BOOTS],
    raw_repl: ctl[SLOT.RAW] === 1,
    busy: ctl[SLOT.BUSY] === 1,
  };
}

const ops = {
  status: () => status(),
  set_wan: ({ up }) => { Atomics.store(ctl, SLOT.WAN, up ? 1 : 0); },
  press_button: ({ n = 1 }) => { Atomics.add(ctl, SLOT.BUTTONS, n); },
  press_keys: ({ keys }) => {
    const head = Atomics.load(ctl, SLOT.KEY_HEAD);
    const tail = Atomics.load(ctl, SLOT.KEY_TAIL);
    const b = Buffer.from(String(keys), "latin1");
    if (((head - tail) | 0) + b.length > KEY_SIZE) throw new Error("the keypad queue is full");
    for (let i = 0; i < b.length; i++) keyq[(head + i) & (KEY_SIZE - 1)] = b[i];
    Atomics.store(ctl, SLOT.KEY_HEAD, (head + b.length) | 0);
  },
  keys_pending: () => (Atomics.load(ctl, SLOT.KEY_HEAD) - Atomics.load(ctl, SLOT.KEY_TAIL)) | 0,
  display: ({ pixels = false }) => readDisplay(pixels),
  // Wait (up to ms) until the display's generation passes `gen`; return the display.
  display_wait: async ({ gen, ms = 1000 }) => {
    const deadline = Date.now() + ms;
    for (;;) {
      const g = Atomics.load(ctl, SLOT.DISP_GEN);
      if (!(g & 1) && (g >> 1) > gen) return readDisplay(false);
      const left = deadline - Date.now();
      if (left <= 0) return readDisplay(false);
      const r = Atomics.waitAsync(ctl, SLOT.DISP_GEN, g, Math.min(left, 50));
      if (r.async) await r.value;
    }
  },
  add_pulses: ({ n }) => { Atomics.add(ctl, SLOT.PULSES, n); },
  clock_set: ({ t }) => { setClockMs(BigInt(Math.round(t * 1000))); },
  clock_advance: ({ s }) => {
    const ms = BigInt(Math.round(s * 1000));
    if (ms < 0n) throw new Error("the clock only moves forward with advance; use clock_set");
    clk[0] += ms; clk[1] += ms; clk[2] += ms;
  },
  clock_freeze: ({ on }) => {
    if (on && !ctl[SLOT.FROZEN]) { clk[1] = clockMs(); Atomics.store(ctl, SLOT.FROZEN, 1); }
    if (!on && ctl[SLOT.FROZEN]) { clk[0] = clk[1] - BigInt(Date.now()); Atomics.store(ctl, SLOT.FROZEN, 0); }
  },
  clock_survives: ({ on }) => { Atomics.store(ctl, SLOT.CLOCK_KEEP, on ? 1 : 0); },
  cut_after: ({ n }) => { Atomics.store(ctl, SLOT.CUT, n === null || n === undefined ? -1 : n); },
  set_seed: ({ seed }) => { Atomics.store(ctl, SLOT.SEED, seed); },
  power_on: () => {
    if (worker) throw new Error("the board is already powered");
    clearInput();
    // The board was off (a rig power-off or a flash cut): a clock without a battery lost its time.
    if (!ctl[SLOT.CLOCK_KEEP]) setClockMs(LOST_CLOCK_MS);
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
