// Layout of the SharedArrayBuffer shared by the Node main thread (pty + control channel) and the
// VM worker (hil/vboard/worker.mjs).  Int32 slots, used with Atomics.
export const SLOT = {
  IN_HEAD: 0,    // REPL input ring: bytes written by the main thread (wrapping counter)
  IN_TAIL: 1,    // ... bytes taken by the worker
  WAN: 2,        // WAN-status input, 0/1
  BUTTONS: 3,    // button presses not yet taken by the firmware
  PULSES: 4,     // energy pulses not yet taken by the firmware
  CUT: 5,        // flash operations to let through before tearing one; -1 = disarmed
  ERASES: 6,     // counters since the process started
  PROGRAMS: 7,
  POWERED: 8,    // 1 while the board has power
  BUSY: 9,       // 1 while the VM executes Python (not waiting at the REPL)
  IDLE_GEN: 10,  // bumped every time the VM comes back to the REPL
  RAW: 11,       // 1 while the REPL is in raw mode
  RELAY: 12,     // last relay command from the firmware: -1 never set, 0 open, 1 closed
  SEED: 13,      // NorFlash seed for torn operations
  BOOTS: 14,     // VM starts (power-on, hard, soft, watchdog)
  FROZEN: 15,    // 1: the meter clock stands still
  TORN: 16,      // torn flash operations
  SLEEP: 17,     // never written: a place to Atomics.wait on as a sleep
  CLOCK_KEEP: 18, // 1: the board clock runs through a power cut (a battery-backed RTC); 0: it
                  // restarts from 2000-01-01 at every power-on, as on an ESP32 without one
  KEY_HEAD: 19,  // PPMID keypad queue: keys pressed by the rig (wrapping counter)
  KEY_TAIL: 20,  // ... keys taken by the firmware
  DISP_GEN: 21,  // display: bumped before (odd) and after (even) each write of the screen
  DISP_LEN: 22,  // bytes of display text (UTF-8) in the DISP region
  DISP_PIX: 23,  // 1 once the DISP_PIX region holds a framebuffer
};
export const NSLOTS = 32;
export const CLK_OFF = NSLOTS * 4;      // BigInt64 x 4: [0] clock offset ms, [1] frozen clock ms, [2] ticks advance ms
export const RING_OFF = CLK_OFF + 32;
export const RING_SIZE = 1 << 16;       // power of two
export const KEY_OFF = RING_OFF + RING_SIZE;   // PPMID keypad queue (ASCII key names)
export const KEY_SIZE = 256;                     // power of two
export const DISP_OFF = KEY_OFF + KEY_SIZE;      // display text, UTF-8
export const DISP_SIZE = 1024;
export const PIX_OFF = DISP_OFF + DISP_SIZE;     // display framebuffer (128x64 MONO_VLSB)
export const PIX_SIZE = 1024;
export const SAB_SIZE = PIX_OFF + PIX_SIZE;
