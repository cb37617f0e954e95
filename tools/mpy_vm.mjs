// Load the pinned official MicroPython WebAssembly build with this repository's Python
// packages copied into its in-memory filesystem, laid out as on a board (/lib/protocol,
// /lib/firmware) and as in the repository (/repo/...), so tests can find their data files.
import fs from "node:fs";
import path from "node:path";
import url from "node:url";

export const REPO = path.resolve(path.dirname(url.fileURLToPath(import.meta.url)), "..");
const PKG = "@micropython/micropython-webassembly-pyscript";

async function importMicroPython() {
  const entry = path.join(REPO, "node_modules", PKG, "micropython.mjs");
  if (!fs.existsSync(entry)) {
    throw new Error(`MicroPython VM not installed (${entry} missing): run 'make setup'`);
  }
  return import(url.pathToFileURL(entry).href);
}

function copyTree(FS, hostDir, vmDir) {
  FS.mkdirTree(vmDir);
  for (const name of fs.readdirSync(hostDir)) {
    if (name === "__pycache__" || name.startsWith(".")) continue;
    const hostPath = path.join(hostDir, name);
    const vmPath = `${vmDir}/${name}`;
    if (fs.statSync(hostPath).isDirectory()) copyTree(FS, hostPath, vmPath);
    else FS.writeFile(vmPath, fs.readFileSync(hostPath));
  }
}

// dirs: repository-relative folders to copy to /repo/<dir>; each top-level Python package
// among them is importable because /repo is on sys.path.
export async function loadVM({ dirs = ["protocol"], heapsize = 8 * 1024 * 1024, stdout } = {}) {
  const { loadMicroPython } = await importMicroPython();
  const out = stdout || ((data) => process.stdout.write(data));
  const mp = await loadMicroPython({ heapsize, stdout: out, stderr: out, linebuffer: false });
  for (const d of dirs) copyTree(mp.FS, path.join(REPO, d), `/repo/${d}`);
  mp.runPython("import sys, os\nsys.path.insert(0, '/repo')\nos.chdir('/repo')");
  return mp;
}
