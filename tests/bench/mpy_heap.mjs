// Heap figures for one module inside the MicroPython wasm VM.  This port collects
// garbage only between runPython calls (gc.collect() inside one call frees nothing),
// so each measuring step is its own runPython call.  Usage:
//   node tests/bench/mpy_heap.mjs MODULE [SETUP_PY ...]
// Prints one JSON line: {"held_after_import":..., "held_after_setup":...,
// "held_after_each_setup": [...]}; each SETUP_PY runs in its own call after the previous
// ones, and held_after_setup is the figure after the last one.
import { loadVM } from "../../tools/mpy_vm.mjs";

const [mod, ...setups] = process.argv.slice(2);
const mp = await loadVM({ dirs: ["protocol"] });
mp.runPython("import gc\ngc.collect()\n_m0 = gc.mem_alloc()");
mp.runPython(`import ${mod}`);
mp.runPython("gc.collect()\n_m1 = gc.mem_alloc()");
mp.runPython("_ms = []");
for (const setup of setups) {
  mp.runPython(setup);
  mp.runPython("gc.collect()\n_ms.append(gc.mem_alloc() - _m0)");
}
mp.runPython(
  "import json\nprint(json.dumps({'held_after_import': _m1 - _m0, "
  + "'held_after_setup': _ms[-1] if _ms else _m1 - _m0, 'held_after_each_setup': _ms}))");
