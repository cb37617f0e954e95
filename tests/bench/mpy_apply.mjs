// Voucher apply end to end inside the MicroPython wasm VM: verify + window + signed
// receipt + flash commit on the NOR fake, one `ledger.submit` per runPython call.
// This port collects garbage only between runPython calls, so heap figures are taken
// at those boundaries (see tests/bench/bench_apply.py for what each one means).
// Usage: node tests/bench/mpy_apply.mjs SETUP.py COUNT   -> one JSON line on stdout
import fs from "node:fs";
import { loadVM } from "../../tools/mpy_vm.mjs";

const [setupFile, countArg] = process.argv.slice(2);
const count = Number(countArg);
let captured = "";
const mp = await loadVM({ dirs: ["protocol", "firmware"], stdout: (d) => { captured += d; } });
const run = (code) => mp.runPython(code);
const num = (name) => Number(mp.globals.get(name));

run("import sys, gc\nsys.path.insert(0, '/repo/firmware')\ngc.collect()");
run("_m0 = gc.mem_alloc()");
run(fs.readFileSync(setupFile, "utf8"));      // imports, provisions, builds the ledger
run("gc.collect()");
run("_held_boot = gc.mem_alloc() - _m0");
const held_boot = num("_held_boot");

const times = [];
const allocated = [];
const held_after = [];
for (let i = 0; i < count; i++) {
  run("gc.collect()");
  run(`_v = VOUCHERS[${i}]`);
  // One call: nothing is collected inside it, so the mem_alloc delta is the whole churn.
  const t0 = performance.now();
  run("_a0 = gc.mem_alloc()\n_r, _dup = LEDGER.submit(_v)\n_alloc = gc.mem_alloc() - _a0");
  times.push(performance.now() - t0);
  run("assert not _dup");
  allocated.push(num("_alloc"));
  run("_r = _v = None\ngc.collect()");
  run("_held = gc.mem_alloc() - _m0");
  held_after.push(num("_held"));
}
run("_balance = LEDGER.balance_mp\n_receipts = LEDGER.receipt_count");
process.stdout.write(JSON.stringify({
  times_ms: times, allocated, held_boot, held_after,
  balance_mp: num("_balance"), receipts: num("_receipts"), vm_output: captured,
}) + "\n");
