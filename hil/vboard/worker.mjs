// The virtual board's CPU: one MicroPython VM (the pinned npm wasm build) in a worker thread.
//
// One worker = one power-on session.  Soft and hard resets start a fresh VM inside it; a power
// cut (flash cut_after) ends it; the main thread (main.mjs) terminates it for a rig power-off or
// when a Ctrl-C is not honoured (a loop that never calls out).  The worker talks to the world
// with synchronous calls only, so it works while Python runs:
//  - REPL input from a ring in a SharedArrayBuffer (filled by the main thread from the pty);
//    REPL output straight to the pty master with fs.writeSync;
//  - the HAN UART: non-blocking reads/writes on the HAN pty master;
//  - the raw flash partition: a host file, written through after every erase/program;
//  - the board filesystem: MEMFS /board, loaded from a host folder at each VM start and written
//    back on every close/mkdir/unlink/rmdir/rename/truncate.
import fs from "node:fs";
import path from "node:path";
import url from "node:url";
import { workerData, parentPort } from "node:worker_threads";
import { SLOT, NSLOTS, CLK_OFF, RING_OFF, RING_SIZE, KEY_OFF, KEY_SIZE, DISP_OFF, DISP_SIZE,
  PIX_OFF, PIX_SIZE } from "./shared.mjs";

const W = workerData;
const ctl = new Int32Array(W.sab, 0, NSLOTS);
const clk = new BigInt64Array(W.sab, CLK_OFF, 4);
const ring = new Uint8Array(W.sab, RING_OFF, RING_SIZE);
const MASK = RING_SIZE - 1;
const keyq = new Uint8Array(W.sab, KEY_OFF, KEY_SIZE);
const disp = new Uint8Array(W.sab, DISP_OFF, DISP_SIZE);
const pix = new Uint8Array(W.sab, PIX_OFF, PIX_SIZE);
const RT_SRC = fs.readFileSync(new URL("./vm_rt.py", import.meta.url));
const { loadMicroPython } = await import(url.pathToFileURL(W.entry).href);

const realNow = Date.now;
const perfNow = () => performance.now();
const sleepMs = (ms) => Atomics.wait(ctl, SLOT.SLEEP, 0, ms);
const log = (msg) => parentPort.postMessage({ type: "log", msg });

// Thrown from a JS call to leave the VM at once (it is discarded afterwards).
class VMExit {
  constructor(kind) { this.kind = kind; }
}

let mp = null;          // the current VM
let M = null;           // its Emscripten module
let resetCause = 1;     // machine.reset_cause(): PWRON_RESET
let bootTicks = 0;      // perfNow() at this VM session's power-on (ticks_ms origin)
let tickAdv0 = 0n;      // clk[2] at power-on

// ---------------------------------------------------------------------------------- output
const OUT = Buffer.alloc(8192);
let outLen = 0;
let prevOut = 0;
let mute = false;           // drop VM output (while entering raw mode silently)
let swallow = [];           // bytes to drop if they come next ("OK" after a raw-paste)
let tail = "";              // last output characters, to follow the REPL's mode
let dropping = false;       // the pty is full and nobody reads: drop until a write succeeds

function flush() {
  if (executing && M && ringHasData()) takeInput();   // a program that only prints: Ctrl-C too
  let off = 0;
  const deadline = realNow() + 500;
  while (off < outLen) {
    try {
      off += fs.writeSync(W.replFd, OUT, off, outLen - off);
      dropping = false;
    } catch (e) {
      if (e.code !== "EAGAIN") break;
      if (dropping || realNow() > deadline) { dropping = true; break; }
      sleepMs(1);
    }
  }
  outLen = 0;
}

function putRaw(c) {
  OUT[outLen++] = c;
  if (outLen >= OUT.length - 2) flush();
}

function outByte(c) {
  if (mute) return;
  if (swallow.length) {
    if (c === swallow[0]) { swallow.shift(); return; }
    swallow = [];
  }
  tail = (tail + String.fromCharCode(c)).slice(-32);
  if (tail.endsWith("raw REPL; CTRL-B to exit\r\n>") || tail.endsWith("\x04>")) {
    setRaw(true);
    rawLineEmpty = true;
  } else if (tail.endsWith(">>> ")) {
    setRaw(false);
  }
  if (c === 10 && prevOut !== 13) putRaw(13);   // the wasm REPL and print use bare \n
  putRaw(c);
  prevOut = c;
  if (c === 10) flush();
}

function outStr(s) {
  for (const ch of Buffer.from(s, "latin1")) outByte(ch);
}

// ----------------------------------------------------------------------------------- input
const pending = [];     // bytes taken from the ring during execution, for the REPL later

function ringHasData() {
  return Atomics.load(ctl, SLOT.IN_HEAD) !== Atomics.load(ctl, SLOT.IN_TAIL);
}

function ringTake() {
  const head = Atomics.load(ctl, SLOT.IN_HEAD);
  let t = Atomics.load(ctl, SLOT.IN_TAIL);
  const out = [];
  while (t !== head) { out.push(ring[t & MASK]); t = (t + 1) | 0; }
  Atomics.store(ctl, SLOT.IN_TAIL, t);
  return out;
}

// Called from every JS entry while Python runs: Ctrl-C becomes a KeyboardInterrupt (raised
// by the VM at its next backward jump or call), other bytes wait for the REPL; output goes out.
let kbdSeen = false;     // a Ctrl-C is on its way into the VM: USB reads leave input alone
function takeInput() {
  for (const b of ringTake()) {
    if (b === 3) { M._mp_sched_keyboard_interrupt(); kbdSeen = true; }
    else pending.push(b);
  }
}

function hook() {
  // Only while Python code of the board runs: a VM that is starting (MEMFS calls Date.now, so
  // this hook, while it loads the board's files) would die of a KeyboardInterrupt raised in its
  // own set-up; the byte waits for boot.py, main.py or the REPL instead.
  if (executing && ringHasData()) takeInput();
  if (outLen) flush();
}

// Blocking: the next REPL input byte.
function nextByte() {
  for (;;) {
    if (pending.length) return pending.shift();
    const head = Atomics.load(ctl, SLOT.IN_HEAD);
    const t = Atomics.load(ctl, SLOT.IN_TAIL);
    if (head !== t) {
      const b = ring[t & MASK];
      Atomics.store(ctl, SLOT.IN_TAIL, (t + 1) | 0);
      return b;
    }
    if (outLen) flush();
    Atomics.wait(ctl, SLOT.IN_HEAD, head, 1000);
  }
}

// sys.stdin for Python code that reads it (input(), mpremote mount).
function stdinByte() {
  const b = nextByte();
  if (b === 3) M._mp_sched_keyboard_interrupt();
  return b;
}

// time.sleep_ms busy-waits on ticks (Date.now): after 20 reads within one millisecond, wait
// for the next one (or for input), so a sleeping firmware costs no CPU and Ctrl-C gets in.
let lastNow = 0;
let sameNow = 0;
Date.now = () => {
  const t = realNow();
  if (t === lastNow) {
    if (++sameNow > 20) {
      if (M) hook();
      Atomics.wait(ctl, SLOT.IN_HEAD, Atomics.load(ctl, SLOT.IN_HEAD), 1);
    }
  } else {
    lastNow = t;
    sameNow = 0;
  }
  return t;
};

// ------------------------------------------------------------------------------ REPL state
let raw = false;
let rawLineEmpty = true;

function setRaw(on) {
  raw = on;
  Atomics.store(ctl, SLOT.RAW, on ? 1 : 0);
}

let executing = false;

function busy(on) {
  executing = on;
  if (!on) kbdSeen = false;
  Atomics.store(ctl, SLOT.BUSY, on ? 1 : 0);
  if (!on) Atomics.add(ctl, SLOT.IDLE_GEN, 1);
}

// ---------------------------------------------------------------------------- filesystem
const FS_ROOT = "/board";

function hostPath(p) {
  const abs = path.posix.resolve(M.FS.cwd(), p);
  if (abs !== FS_ROOT && !abs.startsWith(FS_ROOT + "/")) return null;
  return path.join(W.fsDir, abs.slice(FS_ROOT.length));
}

function loadTree(FS, hostDir, vmDir) {
  for (const name of fs.readdirSync(hostDir)) {
    if (name.startsWith(".vboard-tmp")) continue;
    const h = path.join(hostDir, name);
    const v = `${vmDir}/${name}`;
    const st = fs.statSync(h);
    if (st.isDirectory()) {
      FS.mkdir(v);
      loadTree(FS, h, v);
    } else if (st.isFile()) {
      FS.writeFile(v, fs.readFileSync(h));
    }
  }
}

function saveFile(FS, vmPath) {
  const h = hostPath(vmPath);
  if (!h) return;
  const tmp = path.join(path.dirname(h), `.vboard-tmp-${process.pid}`);
  fs.writeFileSync(tmp, FS.readFile(vmPath));
  fs.renameSync(tmp, h);   // a kill mid-copy leaves the old file, as a power-safe FS would
}

function patchFS(FS) {
  const wrap = (name, after) => {
    const orig = FS[name].bind(FS);
    FS[name] = (...args) => {
      const r = orig(...args);
      try { after(...args); } catch (e) { log(`fs mirror ${name}: ${e.message}`); }
      return r;
    };
  };
  wrap("close", (stream) => {
    if ((stream.flags & 3) !== 0 && stream.path && FS.isFile(stream.node.mode)) saveFile(FS, stream.path);
  });
  wrap("mkdir", (p) => { const h = hostPath(p); if (h) fs.mkdirSync(h, { recursive: true }); });
  wrap("unlink", (p) => { const h = hostPath(p); if (h) fs.rmSync(h, { force: true }); });
  wrap("rmdir", (p) => { const h = hostPath(p); if (h) fs.rmSync(h, { recursive: true, force: true }); });
  wrap("rename", (a, b) => {
    const ha = hostPath(a), hb = hostPath(b);
    if (ha && hb) fs.renameSync(ha, hb);
  });
  wrap("truncate", (p) => { if (typeof p === "string") saveFile(FS, p); });
  wrap("ftruncate", (fd) => { const s = FS.getStream(fd); if (s && s.path) saveFile(FS, s.path); });
}

// ------------------------------------------------------------------------------- flash
const flashFd = fs.openSync(W.flashPath, "r+");
const flashSize = fs.fstatSync(flashFd).size;

// ----------------------------------------------------------------- the board, for Python
const uartBuf = Buffer.alloc(4096);

// A UART on a pty: non-blocking, like machine.UART(timeout=0); a full pty drops, never blocks.
function uartRead(fd, n) {
  hook();
  if (n === undefined || n === null || n < 0 || n > uartBuf.length) n = uartBuf.length;
  if (n === 0) return null;
  try {
    const got = fs.readSync(fd, uartBuf, 0, n, null);
    return got > 0 ? uartBuf.toString("hex", 0, got) : null;
  } catch (e) {
    if (e.code === "EAGAIN" || e.code === "EIO") return null;
    throw e;
  }
}

function uartWrite(fd, hex) {
  hook();
  const b = Buffer.from(hex, "hex");
  try { return fs.writeSync(fd, b); } catch (e) { return 0; }
}

// The meter's HAN with a second port (the cable to a PPMID, hil/two_board.py): what either
// port sends reaches the HAN UART, frame by frame -- a frame begun on one port is finished
// before the other's bytes go in (HAN frames end in 0x00, SPEC.md §5), so two requesters
// never garble each other -- and what the meter sends goes out on both, like a radio HAN
// that several devices have joined.  With one port in use this is a plain UART.
const hanSrcs = [{ fd: W.hanFd, buf: Buffer.alloc(0) }];
if (W.linkFd >= 0) hanSrcs.push({ fd: W.linkFd, buf: Buffer.alloc(0) });
const SRC_MAX = 4096;
const OWNER_MS = 200;      // a frame left unfinished this long no longer holds the UART
let hanOwner = -1;
let ownerAt = 0;
let hanNext = 0;

function hanRead(n) {
  if (hanSrcs.length === 1) return uartRead(W.hanFd, n);
  hook();
  if (n === undefined || n === null || n < 0 || n > uartBuf.length) n = uartBuf.length;
  if (n === 0) return null;
  for (const s of hanSrcs) {
    if (s.buf.length >= SRC_MAX) continue;
    try {
      const got = fs.readSync(s.fd, uartBuf, 0, SRC_MAX - s.buf.length, null);
      if (got > 0) s.buf = Buffer.concat([s.buf, uartBuf.subarray(0, got)]);
    } catch (e) {
      if (e.code !== "EAGAIN" && e.code !== "EIO") throw e;
    }
  }
  let i = hanOwner;
  if (i >= 0 && !hanSrcs[i].buf.length && realNow() - ownerAt > OWNER_MS) i = hanOwner = -1;
  if (i < 0) {
    for (let k = 0; k < hanSrcs.length; k++) {
      const j = (hanNext + k) % hanSrcs.length;
      if (hanSrcs[j].buf.length) { i = j; break; }
    }
    if (i < 0) return null;
    hanNext = (i + 1) % hanSrcs.length;
  }
  const s = hanSrcs[i];
  if (!s.buf.length) return null;
  let take = Math.min(n, s.buf.length);
  const z = s.buf.subarray(0, take).lastIndexOf(0);
  const ends = z === take - 1;
  if (!ends && z >= 0 && i !== hanOwner) take = z + 1;   // whole frames first
  const out = s.buf.subarray(0, take).toString("hex");
  s.buf = s.buf.subarray(take);
  if (out.slice(-2) === "00") hanOwner = -1;          // delivered up to a frame's end
  else { hanOwner = i; ownerAt = realNow(); }         // mid-frame: this port keeps the UART
  return out;
}

function hanWrite(hex) {
  let r = 0;
  for (const s of hanSrcs) {
    const w = uartWrite(s.fd, hex);
    if (s.fd === W.hanFd) r = w;
  }
  return hanSrcs.length === 1 ? r : Buffer.byteLength(hex, "hex");
}

// USB serial of a PPMID (its REPL pty): what the rig or a phone app types, without
// blocking; Ctrl-C is left to interrupt the program, and nothing after it is taken.
function usbRead(n) {
  hook();
  if (kbdSeen) return null;
  if (executing && ringHasData()) takeInput();
  if (kbdSeen || !pending.length) return null;
  if (n === undefined || n === null || n < 0) n = 256;
  const b = Buffer.from(pending.splice(0, Math.min(n, pending.length)));
  return b.toString("hex");
}

function clockMs() {
  if (Atomics.load(ctl, SLOT.FROZEN)) return clk[1];
  return BigInt(realNow()) + clk[0];
}

const hw = {
  // HAN UART (to the PPMID) and WAN link (to the head end): two ptys on the host.
  han_read(n) { return hanRead(n); },
  han_write(hex) { return hanWrite(hex); },
  // The PPMID: USB serial (the REPL pty), the keypad queue, the display.
  usb_read(n) { return usbRead(n); },
  usb_write(hex) {
    hook();
    for (const c of Buffer.from(hex, "hex")) outByte(c);
    flush();
    return hex.length >> 1;
  },
  take_keys() {
    hook();
    const head = Atomics.load(ctl, SLOT.KEY_HEAD);
    let t = Atomics.load(ctl, SLOT.KEY_TAIL);
    if (head === t) return null;
    let s = "";
    while (t !== head) { s += String.fromCharCode(keyq[t & (KEY_SIZE - 1)]); t = (t + 1) | 0; }
    Atomics.store(ctl, SLOT.KEY_TAIL, t);
    return s;
  },
  display(text, hex) {
    hook();
    const b = Buffer.from(String(text), "utf8").subarray(0, DISP_SIZE);
    Atomics.add(ctl, SLOT.DISP_GEN, 1);                   // odd: being written
    disp.set(b);
    Atomics.store(ctl, SLOT.DISP_LEN, b.length);
    if (hex) {
      pix.set(Buffer.from(hex, "hex").subarray(0, PIX_SIZE));
      Atomics.store(ctl, SLOT.DISP_PIX, 1);
    }
    Atomics.add(ctl, SLOT.DISP_GEN, 1);                   // even: whole
    Atomics.notify(ctl, SLOT.DISP_GEN);
  },
  wan_read(n) { return uartRead(W.wanFd, n); },
  wan_write(hex) { return uartWrite(W.wanFd, hex); },
  set_relay(on) { hook(); Atomics.store(ctl, SLOT.RELAY, on ? 1 : 0); },
  wan() { hook(); return Atomics.load(ctl, SLOT.WAN) === 1; },
  take_buttons() { hook(); return Atomics.exchange(ctl, SLOT.BUTTONS, 0); },
  take_pulses() { hook(); return Atomics.exchange(ctl, SLOT.PULSES, 0); },
  clock() { hook(); return (clockMs() / 1000n).toString(); },
  // true if the clock runs through a power cut (boards.virtual: clock_survives_power_loss)
  clock_survives() { hook(); return Atomics.load(ctl, SLOT.CLOCK_KEEP) === 1; },
  clock_set(s) {
    hook();
    const ms = BigInt(s) * 1000n;
    if (Atomics.load(ctl, SLOT.FROZEN)) clk[1] = ms; else clk[0] = ms - BigInt(realNow());
  },
  ticks_ms() {
    hook();
    return (BigInt(Math.floor(perfNow() - bootTicks)) + (clk[2] - tickAdv0)).toString();
  },
  random_hex(n) { hook(); return Buffer.from(globalThis.crypto.getRandomValues(new Uint8Array(n))).toString("hex"); },
  sleep_ms(ms) {
    const end = perfNow() + ms;
    for (;;) {
      hook();
      const left = end - perfNow();
      if (left <= 0) return;
      Atomics.wait(ctl, SLOT.IN_HEAD, Atomics.load(ctl, SLOT.IN_HEAD), Math.min(left, 20));
    }
  },
  reset_cause() { return resetCause; },
  reset() { throw new VMExit("hard"); },
  // Raw flash: geometry, the whole image (hex) at start-up, one call per erase/program.
  flash_size() { return flashSize; },
  flash_seed() { return Atomics.load(ctl, SLOT.SEED); },
  flash_read_all() {
    const b = Buffer.alloc(flashSize);
    fs.readSync(flashFd, b, 0, flashSize, 0);
    return b.toString("hex");
  },
  // Count one operation (0 = program a page, 1 = erase a block); true if it is to be torn.
  flash_op(kind) {
    hook();
    Atomics.add(ctl, kind === 1 ? SLOT.ERASES : SLOT.PROGRAMS, 1);
    for (;;) {
      const c = Atomics.load(ctl, SLOT.CUT);
      if (c < 0) return false;
      if (Atomics.compareExchange(ctl, SLOT.CUT, c, c === 0 ? -1 : c - 1) !== c) continue;
      if (c === 0) Atomics.add(ctl, SLOT.TORN, 1);
      return c === 0;
    }
  },
  flash_write(addr, hex) {
    const b = Buffer.from(hex, "hex");
    fs.writeSync(flashFd, b, 0, b.length, addr);
  },
  flash_erased(addr, n) {
    fs.writeSync(flashFd, Buffer.alloc(n, 0xff), 0, n, addr);
  },
  // The torn operation is on the file: the board is off from here on.
  power_cut() { throw new VMExit("poweroff"); },
};

// ---------------------------------------------------------------------------- the VM
async function newVM() {
  mp = null;
  M = null;
  mp = await loadMicroPython({
    heapsize: W.heapsize,
    linebuffer: false,
    stdout: (d) => outByte(d[0]),
    stderr: (d) => outByte(d[0]),
    stdin: stdinByte,
  });
  M = mp._module;
  Atomics.add(ctl, SLOT.BOOTS, 1);
  const FS = mp.FS;
  FS.mkdir(FS_ROOT);
  loadTree(FS, W.fsDir, FS_ROOT);
  patchFS(FS);
  FS.writeFile("/vboard_rt.py", RT_SRC);
  mp.registerJsModule("_vboard", hw);
  mp.runPython("exec(compile(open('/vboard_rt.py').read(), '<vboard>', 'exec'), {'__name__': '_vboard_rt'})");
  FS.unlink("/vboard_rt.py");
}

function runFile(name) {
  busy(true);
  try {
    mp.runPython(`__import__('_vboard_rt').run_file('${name}')`);
    return mp.runPython(`__import__('_vboard_rt').last`) === 1;
  } finally {
    busy(false);
  }
}

// Feed one byte to the event-driven REPL; true if it asked for a soft reset.
function replChar(b) {
  if (raw && b !== 1 && b !== 2 && b !== 3 && b !== 4) rawLineEmpty = false;
  if (raw && b === 3) rawLineEmpty = true;
  busy(true);
  let r;
  try {
    r = mp.replProcessChar(b);
  } finally {
    busy(false);
  }
  return (r & 0x100) !== 0;
}

function enterRawSilently() {
  mute = true;
  mp.replInit();
  mp.replProcessChar(1);
  mute = false;
  setRaw(true);
  rawLineEmpty = true;
}

// kind: "power" (power-on or hard reset: boot.py, main.py), "soft" (boot.py; main.py only in
// friendly mode), "interrupted" (the watchdog restarted a VM stuck in a loop: no scripts).
async function boot(kind, wasRaw) {
  await newVM();
  if (kind === "interrupted") {
    if (wasRaw) {
      enterRawSilently();
      outStr("\x04Traceback (most recent call last):\r\nKeyboardInterrupt: (virtual board: the VM was restarted)\r\n\x04>");
    } else {
      outStr("Traceback (most recent call last):\r\nKeyboardInterrupt: (virtual board: the VM was restarted)\r\n");
      mp.replInit();
    }
    parentPort.postMessage({ type: "ready" });
    return false;
  }
  if (runFile("boot.py")) return true;   // boot.py asked for a soft reset
  parentPort.postMessage({ type: "ready" });
  if (kind === "soft" && wasRaw) {
    enterRawSilently();
    outStr("raw REPL; CTRL-B to exit\r\n>");
    return false;
  }
  if (runFile("main.py")) return true;
  setRaw(false);
  mp.replInit();
  return false;
}

// Raw-paste mode (mpremote's \x05A\x01), which hangs in this build: done here.  The code is
// collected with the window/flow-control handshake, then fed to the raw REPL as if typed.
const PASTE_WINDOW = 4096;

function rawPaste() {
  putRaw(0x52); putRaw(0x01);                                   // "R\x01": supported
  putRaw(PASTE_WINDOW & 0xff); putRaw(PASTE_WINDOW >> 8);       // window size, little-endian
  flush();
  const code = [];
  let inWindow = 0;
  for (;;) {
    const c = nextByte();
    if (c === 4) break;
    if (c === 3) return false;                                  // abandoned by the host
    code.push(c);
    if (++inWindow === PASTE_WINDOW) { inWindow = 0; putRaw(1); flush(); }
  }
  putRaw(4);                                                    // end of data acknowledged
  flush();
  busy(true);
  try {
    for (const c of code) mp.replProcessChar(c);
  } finally {
    busy(false);
  }
  swallow = [0x4f, 0x4b];                                       // raw mode's "OK": not in raw-paste
  return replChar(4);
}

async function main() {
  bootTicks = perfNow();
  tickAdv0 = clk[2];
  resetCause = { power: 1, hard: 2, interrupted: 2 }[W.kind] || 1;
  let soft = await boot(W.kind, W.wasRaw);
  for (;;) {
    if (soft) {
      outStr("MPY: soft reboot\r\n");
      resetCause = 5;
      soft = await boot("soft", raw);
      continue;
    }
    const b = nextByte();
    if (raw && rawLineEmpty && b === 5) {
      const b2 = nextByte();
      const b3 = nextByte();
      if (b3 === 1) {
        if (b2 === 0x41) soft = rawPaste();
        else { putRaw(0x52); putRaw(0); flush(); }             // "R\x00": unknown command
        rawLineEmpty = true;
        continue;
      }
      soft = replChar(b) || replChar(b2) || replChar(b3);
      continue;
    }
    soft = replChar(b);
  }
}

async function session() {
  for (;;) {
    try {
      await main();
      return;
    } catch (e) {
      if (!(e instanceof VMExit)) throw e;
      flush();
      pending.length = 0;
      swallow = [];
      mute = false;
      if (e.kind === "poweroff") {
        mp = null;
        M = null;
        parentPort.postMessage({ type: "poweroff" });
        return;
      }
      // hard reset (machine.reset): a fresh VM in this worker, as at power-on
      W.kind = "hard";
      setRaw(false);
      Atomics.store(ctl, SLOT.RELAY, -1);
    }
  }
}

await session();
