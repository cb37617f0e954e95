// Run one Python script inside the MicroPython VM with protocol/ (and firmware/, tests/)
// importable.  Usage: node tools/mpy_run.mjs SCRIPT.py [--heap BYTES]
import fs from "node:fs";
import { loadVM } from "./mpy_vm.mjs";

const args = process.argv.slice(2);
const heapAt = args.indexOf("--heap");
const heapsize = heapAt >= 0 ? Number(args.splice(heapAt, 2)[1]) : undefined;
if (args.length !== 1) {
  console.error("usage: node tools/mpy_run.mjs SCRIPT.py [--heap BYTES]");
  process.exit(2);
}
const dirs = ["protocol", "tests"].concat(fs.existsSync("firmware") ? ["firmware"] : []);
const mp = await loadVM({ dirs, heapsize });
try {
  mp.runPython(fs.readFileSync(args[0], "utf8"));
} catch (err) {
  process.stderr.write(String(err.message || err) + "\n");
  process.exit(1);
}
