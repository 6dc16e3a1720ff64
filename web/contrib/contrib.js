/*! Stardust browser node: contribute a browser tab's idle compute to a Stardust domain.
 *
 *   <script src="http://DOMAIN/contrib.js"></script>
 *   const node = await Stardust.contribute({ domain, cpuLimit: 0.3, onCredit, onTask, onError });
 *   (`gateway: "https://GATEWAY"` holds the session through a connection gateway of the domain)
 *   node.pause(); node.resume(); node.stats(); node.disconnect();
 *
 * The same protocol as native nodes (docs/protocol.md is the contract for both): an Ed25519
 * key made in the browser (WebCrypto; a vendored @noble/ed25519 where WebCrypto lacks
 * Ed25519) and kept in IndexedDB signs the hello and the results; tasks run in Web Workers
 * under a WASI preview 1 host that follows protocol.md §7 to the bit, so the metered fuel,
 * the output and the status match a native node's. No dependencies, no framework.
 */
(function (global) {
  "use strict";

  // ---------------------------------------------------------------------------------------
  // Core: pure functions used by the page and, stringified, by every worker.
  // ---------------------------------------------------------------------------------------
  function core() {
    // BLAKE3 (the content id hash, protocol.md §2): the reference algorithm, 32-byte output.
    const IV = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
      0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
    const PERM = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8];
    const CHUNK_START = 1, CHUNK_END = 2, PARENT = 4, ROOT = 8;
    const v = new Uint32Array(16);
    function g(a, b, c, d, x, y) {
      v[a] = v[a] + v[b] + x; v[d] ^= v[a]; v[d] = (v[d] >>> 16) | (v[d] << 16);
      v[c] = v[c] + v[d]; v[b] ^= v[c]; v[b] = (v[b] >>> 12) | (v[b] << 20);
      v[a] = v[a] + v[b] + y; v[d] ^= v[a]; v[d] = (v[d] >>> 8) | (v[d] << 24);
      v[c] = v[c] + v[d]; v[b] ^= v[c]; v[b] = (v[b] >>> 7) | (v[b] << 25);
    }
    // Compresses one 64-byte block (16 words in m) into the chaining value cv (8 words).
    function compress(cv, m, counter, len, flags) {
      for (let i = 0; i < 8; i++) { v[i] = cv[i]; v[i + 8] = IV[i]; }
      v[12] = counter >>> 0; v[13] = Math.floor(counter / 4294967296) >>> 0;
      v[14] = len; v[15] = flags;
      let w = m.slice();
      for (let r = 0; r < 7; r++) {
        g(0, 4, 8, 12, w[0], w[1]); g(1, 5, 9, 13, w[2], w[3]);
        g(2, 6, 10, 14, w[4], w[5]); g(3, 7, 11, 15, w[6], w[7]);
        g(0, 5, 10, 15, w[8], w[9]); g(1, 6, 11, 12, w[10], w[11]);
        g(2, 7, 8, 13, w[12], w[13]); g(3, 4, 9, 14, w[14], w[15]);
        if (r < 6) { const p = new Uint32Array(16); for (let i = 0; i < 16; i++) p[i] = w[PERM[i]]; w = p; }
      }
      const out = new Uint32Array(8);
      for (let i = 0; i < 8; i++) out[i] = v[i] ^ v[i + 8];
      return out;
    }
    function words(bytes, at, len) {
      const m = new Uint32Array(16);
      for (let i = 0; i < len; i++) m[i >> 2] |= bytes[at + i] << ((i & 3) * 8);
      return m;
    }
    function blake3(bytes) {
      const chunks = Math.max(1, Math.ceil(bytes.length / 1024));
      const stack = [];
      let last = null; // the final node, compressed last with ROOT: {cv, m, counter, len, flags}
      for (let c = 0; c < chunks; c++) {
        const start = c * 1024, end = Math.min(bytes.length, start + 1024);
        const blocks = Math.max(1, Math.ceil((end - start) / 64));
        let cv = IV;
        for (let b = 0; b < blocks; b++) {
          const at = start + b * 64, len = Math.min(64, end - at);
          const m = words(bytes, at, len);
          let flags = (b === 0 ? CHUNK_START : 0) | (b === blocks - 1 ? CHUNK_END : 0);
          if (b === blocks - 1 && c === chunks - 1) { last = { cv, m, counter: c, len, flags }; break; }
          cv = compress(cv, m, c, len, flags);
        }
        if (c < chunks - 1) {
          let total = c + 1;
          while ((total & 1) === 0) {
            const left = stack.pop(), m = new Uint32Array(16);
            m.set(left, 0); m.set(cv, 8);
            cv = compress(IV, m, 0, 64, PARENT);
            total >>= 1;
          }
          stack.push(cv);
        }
      }
      while (stack.length) {
        const right = compress(last.cv, last.m, last.counter, last.len, last.flags);
        const m = new Uint32Array(16);
        m.set(stack.pop(), 0); m.set(right, 8);
        last = { cv: IV, m, counter: 0, len: 64, flags: PARENT };
      }
      const h = compress(last.cv, last.m, 0, last.len, last.flags | ROOT);
      const out = new Uint8Array(32);
      for (let i = 0; i < 32; i++) out[i] = h[i >> 2] >>> ((i & 3) * 8);
      return out;
    }
    function hex(bytes) {
      let s = "";
      for (let i = 0; i < bytes.length; i++) s += (bytes[i] < 16 ? "0" : "") + bytes[i].toString(16);
      return s;
    }
    function unhex(s) {
      if (!/^([0-9a-f]{2})*$/.test(s)) throw new Error("not lowercase hex: " + s);
      const out = new Uint8Array(s.length / 2);
      for (let i = 0; i < out.length; i++) out[i] = parseInt(s.substr(i * 2, 2), 16);
      return out;
    }
    const contentId = (bytes) => "b3:" + hex(blake3(bytes));

    // SplitMix64 (protocol.md §7), wrapping u64 arithmetic with BigInt.
    const M64 = (x) => BigInt.asUintN(64, x);
    function splitmix(seed) {
      let state = M64(BigInt(seed));
      return function next() {
        state = M64(state + 0x9e3779b97f4a7c15n);
        let z = state;
        z = M64((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n);
        z = M64((z ^ (z >> 27n)) * 0x94d049bb133111ebn);
        return z ^ (z >> 31n);
      };
    }

    // The WASI preview 1 host of protocol.md §7, deny by default, with the host costs of §6.
    const HOST_CALL_COST = 32n;
    const REALTIME_ORIGIN_NS = 1704067200000000000n, CLOCK_STEP_NS = 1000000n;
    const SUCCESS = 0, EBADF = 8, EFAULT = 21, EINVAL = 28, ENOSYS = 52, ENOTSUP = 58, ESPIPE = 70;
    const IOV_MAX = 1024;
    // Every function of wasi_snapshot_preview1 (name → whether its first argument is a descriptor).
    const WASI = ["args_get", "args_sizes_get", "environ_get", "environ_sizes_get", "clock_res_get",
      "clock_time_get", "fd_advise", "fd_allocate", "fd_close", "fd_datasync", "fd_fdstat_get",
      "fd_fdstat_set_flags", "fd_fdstat_set_rights", "fd_filestat_get", "fd_filestat_set_size",
      "fd_filestat_set_times", "fd_pread", "fd_prestat_get", "fd_prestat_dir_name", "fd_pwrite",
      "fd_read", "fd_readdir", "fd_renumber", "fd_seek", "fd_sync", "fd_tell", "fd_write",
      "path_create_directory", "path_filestat_get", "path_filestat_set_times", "path_link",
      "path_open", "path_readlink", "path_remove_directory", "path_rename", "path_symlink",
      "path_unlink_file", "poll_oneoff", "proc_exit", "proc_raise", "sched_yield", "random_get",
      "sock_accept", "sock_recv", "sock_send", "sock_shutdown"];
    class Stop { constructor(kind, code) { this.kind = kind; this.code = code; } }

    function denied(name, fd) {
      const std = typeof fd === "number" && fd >= 0 && fd <= 2;
      if (name === "fd_close") return std ? SUCCESS : EBADF;
      if (name === "fd_prestat_get" || name === "fd_prestat_dir_name") return EBADF;
      if (std && (name === "fd_seek" || name === "fd_tell" || name === "fd_pread" || name === "fd_pwrite")) return ESPIPE;
      if (name.startsWith("fd_") || name.startsWith("path_")) return std ? ENOTSUP : EBADF;
      if (name === "sched_yield") return SUCCESS;
      if (name === "poll_oneoff" || name.startsWith("sock_")) return ENOTSUP;
      return ENOSYS;
    }

    // The smallest memory the module declares, in pages (0 without a memory section).
    function memoryMinPages(bytes) {
      let at = 8;
      const leb = () => { let r = 0, s = 0, b; do { b = bytes[at++]; r += (b & 0x7f) * 2 ** s; s += 7; } while (b & 0x80); return r; };
      while (at < bytes.length) {
        const id = bytes[at++], size = leb(), end = at + size;
        if (id === 5) { if (leb() === 0) return 0; leb(); return leb(); }
        at = end;
      }
      return 0;
    }

    const TRAPS = [
      [/unreachable/, "unreachable"],
      [/memory access out of bounds|data segment|out of bounds memory/, "memory_out_of_bounds"],
      [/null function|invalid index into function table|uninitialized element/, "indirect_call_to_null"],
      [/signature mismatch/, "bad_signature"],
      [/table|element segment/, "table_out_of_bounds"],
      [/divide by zero|remainder by zero|division by zero/, "integer_division_by_zero"],
      [/unrepresentable|integer overflow/, "integer_overflow"],
    ];
    function trapKind(e) {
      if (e instanceof RangeError && /call stack/i.test(e.message)) return "stack_overflow";
      const msg = String(e && e.message);
      if (/float unrepresentable/.test(msg)) return "bad_conversion_to_integer";
      for (const [re, kind] of TRAPS) if (re.test(msg)) return kind;
      return "other";
    }

    // Runs a metered module (a compiled WebAssembly.Module) as protocol.md §6–§7 say:
    // returns { report (without output id and wall time), output, stderr }.
    function run(module, minPages, task) {
      const limits = task.limits, fuelLimit = BigInt(limits.fuel);
      const pages = Math.floor(limits.memory_bytes / 65536);
      const end = (status, extra) => Object.assign({ status, fuel_used: 0 }, extra);
      const invalid = (detail) => ({ report: end("invalid_module", { detail }), output: new Uint8Array(0), stderr: "" });
      for (const imp of WebAssembly.Module.imports(module)) {
        if (imp.module !== "wasi_snapshot_preview1" || !WASI.includes(imp.name) || imp.kind !== "function")
          return invalid("unknown import " + imp.module + "." + imp.name);
      }
      const exports = {};
      for (const e of WebAssembly.Module.exports(module)) exports[e.name] = e.kind;
      if (exports.__stardust_fuel !== "global" || exports.__stardust_memory_limit !== "global" || exports.__stardust_oom !== "global")
        return invalid("module is not metered");
      if (exports._start !== "function") return invalid("missing `_start` export (a WASI command module is required)");
      if (WebAssembly.Module.imports(module).length && exports.memory !== "memory")
        return invalid("module imports WASI but exports no memory named \"memory\"");

      const enc = new TextEncoder();
      const argv = ["task"].concat(task.args).map((a) => enc.encode(a + "\0"));
      const argvLen = argv.reduce((n, a) => n + a.length, 0);
      const input = task.input;
      let inputPos = 0, clockCalls = 0n;
      const outCap = limits.output_bytes, errCap = 64 << 10;
      const outParts = []; let outLen = 0;
      const errParts = []; let errLen = 0;
      const rng = splitmix(task.seed);
      let inst = null;
      const fuel = () => inst.exports.__stardust_fuel;
      const charge = (n) => { const f = fuel(); f.value = f.value - n; };
      const bytesCost = (n) => BigInt(Math.floor(n / 64));
      const mem = () => inst.exports.memory ? new Uint8Array(inst.exports.memory.buffer) : null;
      const u32 = (x) => x >>> 0;
      const fits = (m, at, len) => at + len <= m.length;
      const put = (m, at, bytes) => { if (!fits(m, at, bytes.length)) return false; m.set(bytes, at); return true; };
      const le32 = (x) => new Uint8Array(new Uint32Array([x >>> 0]).buffer);
      const le64 = (x) => new Uint8Array(new BigUint64Array([x]).buffer);
      const get32 = (m, at) => fits(m, at, 4) ? (m[at] | (m[at + 1] << 8) | (m[at + 2] << 16) | (m[at + 3] << 24)) >>> 0 : null;
      function iovecs(m, iovs, count) {
        iovs = u32(iovs); count = u32(count);
        if (count > IOV_MAX) return EINVAL;
        const out = [];
        for (let i = 0; i < count; i++) {
          const base = iovs + i * 8;
          if (base > 0xffffffff) return EFAULT;
          const ptr = get32(m, base), len = get32(m, base + 4);
          if (ptr === null || len === null || ptr + len > m.length) return EFAULT;
          out.push([ptr, len]);
        }
        return out;
      }
      const host = {
        fd_write(fd, iovs, count, nwritten) {
          charge(HOST_CALL_COST);
          if (fd !== 1 && fd !== 2) return EBADF;
          const m = mem(); if (!m) return EFAULT;
          const vecs = iovecs(m, iovs, count);
          if (typeof vecs === "number") return vecs;
          let total = 0, full = false;
          for (const [ptr, len] of vecs) {
            if (fd === 1) {
              const room = outCap - outLen;
              if (len > room) { outParts.push(m.slice(ptr, ptr + room)); outLen += room; total += room; full = true; break; }
              outParts.push(m.slice(ptr, ptr + len)); outLen += len;
            } else {
              const keep = Math.min(len, errCap - errLen);
              errParts.push(m.slice(ptr, ptr + keep)); errLen += keep;
            }
            total += len;
          }
          if (full) { charge(bytesCost(total)); throw new Stop("output_full"); }
          if (!put(m, u32(nwritten), le32(total))) return EFAULT;
          charge(bytesCost(total));
          return SUCCESS;
        },
        fd_read(fd, iovs, count, nread) {
          charge(HOST_CALL_COST);
          if (fd !== 0) return EBADF;
          const m = mem(); if (!m) return EFAULT;
          const vecs = iovecs(m, iovs, count);
          if (typeof vecs === "number") return vecs;
          let total = 0;
          for (const [ptr, len] of vecs) {
            const n = Math.min(len, input.length - inputPos);
            m.set(input.subarray(inputPos, inputPos + n), ptr);
            inputPos += n; total += n;
            if (n < len) break;
          }
          if (!put(m, u32(nread), le32(total))) return EFAULT;
          charge(bytesCost(total));
          return SUCCESS;
        },
        args_sizes_get(c, s) { return sizes(c, s, argv.length, argvLen); },
        environ_sizes_get(c, s) { return sizes(c, s, 0, 0); },
        args_get(argvPtr, bufPtr) {
          charge(HOST_CALL_COST);
          const m = mem(); if (!m) return EFAULT;
          let offset = 0;
          for (let i = 0; i < argv.length; i++) {
            const ptr = u32(bufPtr + offset);
            if (!put(m, u32(argvPtr + i * 4), le32(ptr)) || !put(m, ptr, argv[i])) return EFAULT;
            offset += argv[i].length;
          }
          return SUCCESS;
        },
        environ_get() { charge(HOST_CALL_COST); return SUCCESS; },
        clock_time_get(id, _precision, out) {
          charge(HOST_CALL_COST);
          if (id < 0 || id > 3) return EINVAL;
          const m = mem(); if (!m) return EFAULT;
          const elapsed = clockCalls * CLOCK_STEP_NS;
          clockCalls += 1n;
          return put(m, u32(out), le64(id === 0 ? REALTIME_ORIGIN_NS + elapsed : elapsed)) ? SUCCESS : EFAULT;
        },
        clock_res_get(id, out) {
          charge(HOST_CALL_COST);
          if (id < 0 || id > 3) return EINVAL;
          const m = mem(); if (!m) return EFAULT;
          return put(m, u32(out), le64(CLOCK_STEP_NS)) ? SUCCESS : EFAULT;
        },
        random_get(buf, len) {
          charge(HOST_CALL_COST);
          const m = mem(); if (!m) return EFAULT;
          const start = u32(buf), n = u32(len);
          if (!fits(m, start, n)) return EFAULT;
          for (let i = 0; i < n; i += 8) {
            const word = le64(rng());
            m.set(word.subarray(0, Math.min(8, n - i)), start + i);
          }
          charge(bytesCost(n));
          return SUCCESS;
        },
        fd_fdstat_get(fd, out) {
          charge(HOST_CALL_COST);
          if (fd < 0 || fd > 2) return EBADF;
          const m = mem(); if (!m) return EFAULT;
          const stat = new Uint8Array(24);
          stat[8] = fd === 0 ? 2 : 64; // rights: FD_READ or FD_WRITE
          return put(m, u32(out), stat) ? SUCCESS : EFAULT;
        },
        fd_filestat_get(fd, out) {
          charge(HOST_CALL_COST);
          if (fd < 0 || fd > 2) return EBADF;
          const m = mem(); if (!m) return EFAULT;
          return put(m, u32(out), new Uint8Array(64)) ? SUCCESS : EFAULT;
        },
        proc_exit(code) { charge(HOST_CALL_COST); throw new Stop("exit", code | 0); },
      };
      function sizes(countPtr, sizePtr, count, size) {
        charge(HOST_CALL_COST);
        const m = mem(); if (!m) return EFAULT;
        return put(m, u32(countPtr), le32(count)) && put(m, u32(sizePtr), le32(size)) ? SUCCESS : EFAULT;
      }
      for (const name of WASI) {
        if (!host[name]) host[name] = (fd) => { charge(HOST_CALL_COST); return denied(name, fd); };
      }

      let ended;
      if (minPages > pages) {
        ended = { status: "out_of_memory" };
      } else {
        try {
          inst = new WebAssembly.Instance(module, { wasi_snapshot_preview1: host });
        } catch (e) {
          // A segment out of bounds traps at instantiation as in wasmtime; an allocation
          // the browser refuses is out of memory; a link error is an invalid module.
          if (e instanceof WebAssembly.RuntimeError) ended = { status: "trap", trap: trapKind(e) };
          else if (e instanceof RangeError) ended = { status: "out_of_memory" };
          else return invalid(String(e && e.message || e));
        }
      }
      if (!ended) {
        inst.exports.__stardust_fuel.value = fuelLimit;
        inst.exports.__stardust_memory_limit.value = pages | 0;
        try {
          inst.exports._start();
          ended = { status: "ok", exit_code: 0 };
        } catch (e) {
          if (e instanceof Stop && e.kind === "exit") ended = e.code === 0 ? { status: "ok", exit_code: 0 } : { status: "exit_nonzero", exit_code: e.code };
          else if (e instanceof Stop) ended = { status: "output_too_large" };
          else if (e instanceof WebAssembly.RuntimeError || e instanceof RangeError) ended = { status: "trap", trap: trapKind(e) };
          else ended = { status: "trap", trap: "other", detail: String(e && e.message || e) };
        }
      }
      // The end-of-run rule (protocol.md §6).
      let fuelUsed = 0;
      if (inst) {
        const left = inst.exports.__stardust_fuel.value;
        if (left < 0n) { ended = { status: "out_of_fuel" }; fuelUsed = limits.fuel; }
        else {
          if (inst.exports.__stardust_oom.value !== 0) ended = { status: "out_of_memory" };
          fuelUsed = Number(fuelLimit - left);
        }
      }
      const output = new Uint8Array(outLen);
      let at = 0;
      for (const p of outParts) { output.set(p, at); at += p.length; }
      const report = Object.assign({}, ended, { fuel_used: fuelUsed });
      const stderr = new TextDecoder().decode(concat(errParts));
      return { report, output, stderr };
    }
    function concat(parts) {
      const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
      let at = 0;
      for (const p of parts) { out.set(p, at); at += p.length; }
      return out;
    }
    return { blake3, hex, unhex, contentId, splitmix, memoryMinPages, run, concat };
  }

  // The worker: runs one task per message, hashes the output, answers.
  function workerMain(core) {
    self.onmessage = (ev) => {
      const { id, module, minPages, task } = ev.data;
      const started = performance.now();
      const r = core.run(module, minPages, task);
      r.report.output = core.contentId(r.output);
      r.report.output_len = r.output.length;
      r.report.wall_ms = Math.round(performance.now() - started);
      self.postMessage({ id, report: r.report, output: r.output, stderr: r.stderr }, [r.output.buffer]);
    };
  }

  const C = core();
  const enc = new TextEncoder(), dec = new TextDecoder();
  let workerUrl = null;
  function newWorker() {
    if (!workerUrl) {
      const src = "\"use strict\";(" + workerMain.toString() + ")((" + core.toString() + ")());";
      workerUrl = URL.createObjectURL(new Blob([src], { type: "text/javascript" }));
    }
    return new Worker(workerUrl);
  }

  // Calls `fn` every `ms` from a worker's timer: a hidden tab's own timers may be throttled
  // to one wake-up a minute (Chrome's intensive throttling), which would let leases lapse.
  function ticker(ms, fn) {
    try {
      const url = URL.createObjectURL(new Blob(["setInterval(() => postMessage(0), " + Number(ms) + ");"], { type: "text/javascript" }));
      const w = new Worker(url);
      w.onmessage = fn;
      return { stop() { w.terminate(); URL.revokeObjectURL(url); } };
    } catch (_) {
      const t = setInterval(fn, ms); // a page whose policy forbids blob: workers
      return { stop() { clearInterval(t); } };
    }
  }

  // ---------------------------------------------------------------------------------------
  // Keys: Ed25519 through WebCrypto, else the vendored @noble/ed25519; kept in IndexedDB.
  // ---------------------------------------------------------------------------------------
  function idb(op) {
    return new Promise((resolve, reject) => {
      const open = indexedDB.open("stardust", 1);
      open.onupgradeneeded = () => open.result.createObjectStore("kv");
      open.onerror = () => reject(open.error);
      open.onsuccess = () => {
        const tx = open.result.transaction("kv", "readwrite");
        const req = op(tx.objectStore("kv"));
        tx.oncomplete = () => { open.result.close(); resolve(req.result); };
        tx.onerror = () => reject(tx.error);
      };
    });
  }
  const kvGet = (k) => idb((s) => s.get(k));
  const kvPut = (k, v) => idb((s) => s.put(v, k));

  async function webCryptoEd25519() {
    try {
      const k = await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
      await crypto.subtle.sign({ name: "Ed25519" }, k.privateKey, new Uint8Array(1));
      return true;
    } catch (_) { return false; }
  }

  // An identity: { id (hex public key), publicKey (bytes), sign(bytes) → Promise<bytes>, verify }.
  async function identity(domain, mode, scriptBase) {
    const slot = "key:" + domain;
    const useWebCrypto = mode === "webcrypto" || (mode !== "noble" && await webCryptoEd25519());
    let noble = null;
    const loadNoble = async () => noble || (noble = await import(scriptBase + "/contrib/noble-ed25519.js"));
    let stored = await kvGet(slot);
    if (stored && (stored.kind === "webcrypto") !== useWebCrypto) stored = null;
    if (!stored) {
      if (useWebCrypto) {
        const k = await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
        const pub = new Uint8Array(await crypto.subtle.exportKey("raw", k.publicKey));
        stored = { kind: "webcrypto", privateKey: k.privateKey, publicKey: pub };
      } else {
        const ed = await loadNoble();
        const seed = crypto.getRandomValues(new Uint8Array(32));
        stored = { kind: "noble", seed, publicKey: await ed.getPublicKeyAsync(seed) };
      }
      await kvPut(slot, stored);
    }
    const publicKey = new Uint8Array(stored.publicKey);
    const sign = stored.kind === "webcrypto"
      ? async (bytes) => new Uint8Array(await crypto.subtle.sign({ name: "Ed25519" }, stored.privateKey, bytes))
      : async (bytes) => (await loadNoble()).signAsync(bytes, stored.seed);
    const keys = new Map();
    const verify = useWebCrypto
      ? async (pub, sig, bytes) => {
        const h = C.hex(pub);
        if (!keys.has(h)) keys.set(h, await crypto.subtle.importKey("raw", pub, { name: "Ed25519" }, false, ["verify"]));
        return crypto.subtle.verify({ name: "Ed25519" }, keys.get(h), sig, bytes);
      }
      : async (pub, sig, bytes) => (await loadNoble()).verifyAsync(sig, bytes, pub);
    return { id: C.hex(publicKey), publicKey, sign, verify, kind: stored.kind };
  }

  // ---------------------------------------------------------------------------------------
  // Envelopes (protocol.md §3) and signed REST requests (§5b).
  // ---------------------------------------------------------------------------------------
  const MAGIC = [0x53, 0x44, 0x53, 0x54]; // "SDST"
  async function seal(id, context, message) {
    const ctx = enc.encode(context), body = enc.encode(JSON.stringify(message));
    const head = new Uint8Array(6 + ctx.length + 32 + 4 + body.length);
    head.set(MAGIC, 0); head[4] = 1; head[5] = ctx.length; head.set(ctx, 6);
    head.set(id.publicKey, 6 + ctx.length);
    new DataView(head.buffer).setUint32(38 + ctx.length, body.length, true);
    head.set(body, 42 + ctx.length);
    return C.concat([head, await id.sign(head)]);
  }
  // Parses and verifies a domain envelope; throws on anything malformed.
  async function open(id, bytes, context, maxLen) {
    if (bytes.length > maxLen) throw new Error("oversized frame");
    if (bytes.length < 42 + 64 + 1 || MAGIC.some((b, i) => bytes[i] !== b) || bytes[4] !== 1) throw new Error("malformed envelope");
    const n = bytes[5];
    if (dec.decode(bytes.subarray(6, 6 + n)) !== context) throw new Error("wrong context");
    const signer = bytes.slice(6 + n, 38 + n);
    const m = new DataView(bytes.buffer, bytes.byteOffset).getUint32(38 + n, true);
    if (bytes.length !== 42 + n + m + 64) throw new Error("malformed envelope length");
    const signed = bytes.subarray(0, 42 + n + m), sig = bytes.subarray(42 + n + m);
    if (!await id.verify(signer, sig, signed)) throw new Error("bad signature");
    return { signer: C.hex(signer), message: JSON.parse(dec.decode(bytes.subarray(42 + n, 42 + n + m))) };
  }
  // Signing times only grow: the domain takes a POST signature once, and two identical
  // uploads in one millisecond would otherwise sign the same bytes.
  let lastSigningTime = 0;
  async function signedFetch(id, base, method, path, body) {
    lastSigningTime = Math.max(Date.now(), lastSigningTime + 1);
    const time = String(lastSigningTime);
    const bytes = body || new Uint8Array(0);
    const signing = enc.encode("stardust/v1/request\0" + method + "\n" + path + "\n" + time + "\n" + C.hex(C.blake3(bytes)));
    const sig = C.hex(await id.sign(signing));
    return fetch(base + path, {
      method, body: body || undefined, cache: "no-store",
      headers: { "x-stardust-key": id.id, "x-stardust-time": time, "x-stardust-signature": sig,
        "content-type": "application/octet-stream" },
    });
  }

  // ---------------------------------------------------------------------------------------
  // The node.
  // ---------------------------------------------------------------------------------------
  const VERSION = "0.1.0";
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const RESEND_AFTER_MS = 10000, MAX_FRAME = 16 << 20, MAX_QUEUED_PER_SLOT = 8, RELEASE_AFTER_MS = 30000;

  // Runs a metered module in a fresh worker, like `stardust run` does natively: a local
  // conformance check of this host, also used by the node for every task.
  async function runInWorker(worker, moduleBytes, compiled, task) {
    const minPages = C.memoryMinPages(moduleBytes);
    const started = performance.now();
    return new Promise((resolve) => {
      const w = worker || newWorker();
      const timer = setTimeout(() => {
        w.terminate();
        resolve({ terminated: true, report: { status: "deadline_exceeded", fuel_used: 0, output: C.contentId(new Uint8Array(0)),
          output_len: 0, wall_ms: Math.round(performance.now() - started), detail: "terminated at the wall-clock deadline" },
        output: new Uint8Array(0), stderr: "" });
      }, task.limits.wall_ms);
      w.onmessage = (ev) => { clearTimeout(timer); if (!worker) w.terminate(); resolve(ev.data); };
      w.onerror = (ev) => {
        clearTimeout(timer); w.terminate(); ev.preventDefault();
        resolve({ terminated: true, report: { status: "trap", trap: "other", fuel_used: 0, output: C.contentId(new Uint8Array(0)),
          output_len: 0, wall_ms: Math.round(performance.now() - started), detail: String(ev.message) }, output: new Uint8Array(0), stderr: "" });
      };
      w.postMessage({ id: 0, module: compiled, minPages, task });
    });
  }

  async function runLocal(moduleBytes, options) {
    const bytes = new Uint8Array(moduleBytes);
    const o = options || {};
    const task = {
      input: new Uint8Array(o.input || []), args: (o.args || []).map(String), seed: String(o.seed || 0),
      limits: Object.assign({ fuel: 10e9, memory_bytes: 256 << 20, wall_ms: 60000, output_bytes: 16 << 20 }, o.limits || {}),
    };
    let compiled;
    try { compiled = await WebAssembly.compile(bytes); } catch (e) {
      return { report: { status: "invalid_module", fuel_used: 0, output: C.contentId(new Uint8Array(0)), output_len: 0, wall_ms: 0,
        detail: "invalid module: " + e.message }, output: new Uint8Array(0), stderr: "" };
    }
    return runInWorker(null, bytes, compiled, task);
  }

  async function contribute(options) {
    const o = Object.assign({
      cpuLimit: 0.5, pauseWhenHidden: true, pauseWhenActive: true, activeMs: 3000, fpsFloor: 30,
      batteryFloor: 0.2, memoryBytes: 512 << 20, labels: [], crypto: "auto",
      onCredit() {}, onTask() {}, onError() {}, onState() {},
    }, options || {});
    if (!o.domain) throw new Error("Stardust.contribute: `domain` is required, e.g. \"http://127.0.0.1:7070\"");
    const domain = String(o.domain).replace(/\/+$/, "");
    if (!/^https?:\/\/[^/]+$/.test(domain)) throw new Error("Stardust.contribute: `domain` must be http(s)://HOST[:PORT], not " + o.domain);
    // A connection gateway of the domain may hold the session (docs/protocol.md §5d); blobs
    // and the node's figures still come from the domain.
    const sessionBase = o.gateway ? String(o.gateway).replace(/\/+$/, "") : domain;
    if (!/^https?:\/\/[^/]+$/.test(sessionBase)) throw new Error("Stardust.contribute: `gateway` must be http(s)://HOST[:PORT], not " + o.gateway);
    if (!(o.cpuLimit > 0 && o.cpuLimit <= 1)) throw new Error("Stardust.contribute: `cpuLimit` must be in (0, 1], not " + o.cpuLimit);
    if (typeof WebAssembly !== "object" || typeof Worker !== "function" || !global.indexedDB)
      throw new Error("Stardust.contribute: this browser lacks WebAssembly, Web Workers or IndexedDB");
    const id = await identity(domain, o.crypto, scriptBase || domain);
    const cores = navigator.hardwareConcurrency || 1;
    const slots = Math.max(1, Math.floor(cores * o.cpuLimit));
    const hardware = {
      cores, memory_bytes: o.memoryBytes, cpu_model: "", os: "browser-" + (navigator.platform || "unknown").toLowerCase().replace(/\s+/g, "_"),
      gpus: [], gpu_unusable_reason: null, micro_scu_per_s: 0, labels: o.labels,
    };

    const s = {
      ws: null, domainKey: null, closed: false, connected: false, seq: 0, heartbeatTimer: null,
      queue: [], running: new Map(), cancelled: new Set(), unacked: new Map(), sent: new Map(),
      reasons: new Set(), blobs: new Map(), modules: new Map(), workers: [],
      tasks: 0, fuel: 0, busyMs: 0, connectedAt: 0, uptimeMs: 0, credits: 0, reputation: null, firstTaskMs: null,
      lastInput: 0, restUntil: 0, fps: 60, dutyFactor: 1, pausedAt: 0,
    };
    const t0 = performance.now();
    const err = (e) => { try { o.onError(e instanceof Error ? e : new Error(String(e))); } catch (_) { /* caller's */ } };

    // Owner policy: each reason pauses the node until it clears.
    function setReason(reason, on) {
      const had = s.reasons.size;
      if (on) s.reasons.add(reason); else s.reasons.delete(reason);
      if (had === 0 && s.reasons.size > 0) s.pausedAt = performance.now();
      if (had !== s.reasons.size) {
        try { o.onState({ paused: s.reasons.size > 0, reasons: [...s.reasons] }); } catch (_) { /* the page's */ }
        // Tell the domain at once (free_slots = 0 while paused), not at the next heartbeat.
        if ((had === 0) !== (s.reasons.size === 0)) heartbeat().catch(err);
        pump();
      }
    }
    const listeners = [];
    const listen = (target, ev, fn) => { target.addEventListener(ev, fn, { passive: true }); listeners.push([target, ev, fn]); };
    if (o.pauseWhenHidden) {
      const vis = () => setReason("hidden", document.visibilityState === "hidden");
      listen(document, "visibilitychange", vis); vis();
    }
    if (o.pauseWhenActive) {
      const touch = () => { s.lastInput = performance.now(); setReason("active", true); };
      for (const ev of ["pointerdown", "pointermove", "keydown", "wheel", "touchstart"]) listen(global, ev, touch);
    }
    const policyTimer = setInterval(() => {
      if (o.pauseWhenActive && s.reasons.has("active") && performance.now() - s.lastInput > o.activeMs) setReason("active", false);
      setReason("frame_rate", s.fps < o.fpsFloor && document.visibilityState !== "hidden");
    }, 500);
    // Frame rate: when the page's own frames slow down, the node steps back.
    let frames = 0, frameStart = performance.now(), rafId = 0;
    const frame = (now) => {
      frames++;
      if (now - frameStart >= 1000) { s.fps = frames * 1000 / (now - frameStart); frames = 0; frameStart = now; }
      if (!s.closed) rafId = requestAnimationFrame(frame);
    };
    if (typeof requestAnimationFrame === "function") rafId = requestAnimationFrame(frame);
    // Battery: half the duty cycle on battery, paused below the floor.
    if (navigator.getBattery) {
      navigator.getBattery().then((b) => {
        const update = () => {
          s.dutyFactor = b.charging ? 1 : 0.5;
          setReason("battery", !b.charging && b.level < o.batteryFloor);
        };
        b.addEventListener("chargingchange", update); b.addEventListener("levelchange", update); update();
      }).catch(() => {});
    }

    async function send(context, message) {
      const ws = s.ws;
      if (!ws || ws.readyState !== 1) return false;
      ws.send(await seal(id, context, message));
      return true;
    }
    const paused = () => s.reasons.size > 0;

    async function heartbeat() {
      if (!s.connected) return;
      // Queued work does not wait out a long pause: after RELEASE_AFTER_MS its leases are no
      // longer renewed, so they lapse and the domain gives the tasks to another node.
      if (paused() && s.queue.length && performance.now() - s.pausedAt > RELEASE_AFTER_MS) s.queue = [];
      const held = [...s.running.keys(), ...s.queue.map((a) => a.lease)];
      const free = paused() ? 0 : Math.max(0, slots - held.length);
      // Finished but unacknowledged leases are listed too: they stay ours until recorded.
      const running = [...held, ...s.unacked.keys()];
      await send("stardust/v1/node", { type: "heartbeat", seq: ++s.seq, running, free_slots: free });
      // Unacknowledged results go again after a while (the domain may have dropped a frame).
      const now = performance.now();
      for (const [lease, at] of s.sent) if (now - at > RESEND_AFTER_MS) s.sent.delete(lease);
      flushResults();
    }
    let flushing = false;
    async function flushResults() {
      if (flushing || !s.connected) return;
      flushing = true;
      try {
        const batch = [...s.unacked.values()].filter((r) => !s.sent.has(r.lease)).slice(0, 256);
        if (batch.length && await send("stardust/v1/result", { results: batch })) {
          const now = performance.now();
          for (const r of batch) s.sent.set(r.lease, now);
        }
      } finally { flushing = false; }
    }

    async function fetchBlob(cid) {
      if (s.blobs.has(cid)) return s.blobs.get(cid);
      for (let wait = 200; ; wait = Math.min(wait * 2, 5000)) {
        if (s.closed) throw new Error("disconnected");
        try {
          const res = await signedFetch(id, domain, "GET", "/v1/blobs/" + cid);
          if (res.status === 404) throw Object.assign(new Error("the domain does not have blob " + cid), { fatal: true });
          if (res.ok) {
            const bytes = new Uint8Array(await res.arrayBuffer());
            if (C.contentId(bytes) !== cid) throw new Error("blob " + cid + " does not match its content id");
            // Bounded: at most 16 blobs and 64 MiB, oldest first out.
            s.blobs.set(cid, bytes);
            let total = 0;
            for (const b of s.blobs.values()) total += b.length;
            while (s.blobs.size > 1 && (s.blobs.size > 16 || total > (64 << 20))) {
              const [oldest, b] = s.blobs.entries().next().value;
              s.blobs.delete(oldest); total -= b.length;
            }
            return bytes;
          }
        } catch (e) { if (e.fatal) throw e; }
        await sleep(wait);
      }
    }
    async function compiled(cid, bytes) {
      if (!s.modules.has(cid)) {
        if (s.modules.size >= 8) s.modules.delete(s.modules.keys().next().value);
        s.modules.set(cid, WebAssembly.compile(bytes));
      }
      return s.modules.get(cid);
    }
    async function upload(bytes, cid, lease) {
      for (let wait = 200; ; wait = Math.min(wait * 2, 5000)) {
        if (s.cancelled.has(lease) || s.closed) return false;
        try {
          const res = await signedFetch(id, domain, "PUT", "/v1/blobs/" + cid, bytes);
          if (res.ok) return true;
        } catch (_) { /* retried */ }
        await sleep(wait);
      }
    }

    async function execute(slot, a) {
      const spec = a.spec;
      const task = { input: null, args: spec.args, seed: String(spec.seed), limits: spec.limits };
      let result;
      try {
        const moduleBytes = await fetchBlob(spec.module);
        task.input = await fetchBlob(spec.input);
        let mod;
        try { mod = await compiled(spec.module, moduleBytes); } catch (e) { mod = null; result = { report: {
          status: "invalid_module", fuel_used: 0, output: C.contentId(new Uint8Array(0)), output_len: 0, wall_ms: 0,
          detail: "invalid module: " + e.message }, output: new Uint8Array(0) }; }
        if (mod) {
          if (!s.workers[slot]) s.workers[slot] = newWorker();
          result = await runInWorker(s.workers[slot], moduleBytes, mod, task);
          if (result.terminated) s.workers[slot] = null;
        }
      } catch (e) {
        err(e);
        return null;
      }
      if (!await upload(result.output, result.report.output, a.lease)) return null;
      return { lease: a.lease, task: spec.task, report: result.report };
    }

    // Takes queued assignments while slots are free and the owner allows it.
    function pump() {
      while (!paused() && !s.closed && s.queue.length && s.running.size < slots && performance.now() >= s.restUntil) {
        const a = s.queue.shift();
        if (s.cancelled.has(a.lease)) continue;
        const slot = [...Array(slots).keys()].find((i) => ![...s.running.values()].includes(i));
        s.running.set(a.lease, slot);
        const started = performance.now();
        execute(slot, a).then((r) => {
          s.running.delete(a.lease);
          const took = performance.now() - started;
          s.busyMs += took;
          // Duty cycle: rest so that work takes at most cpuLimit of the time (half on battery).
          const duty = o.cpuLimit * s.dutyFactor;
          if (duty < 1) {
            const rest = took * (1 - duty) / duty;
            s.restUntil = Math.max(s.restUntil, performance.now() + rest);
            setTimeout(pump, rest + 1);
          }
          if (r && !s.cancelled.has(a.lease)) {
            s.tasks++; s.fuel += r.report.fuel_used;
            if (s.firstTaskMs === null) s.firstTaskMs = performance.now() - t0;
            s.unacked.set(a.lease, r);
            try { o.onTask({ lease: a.lease, task: a.spec.task, job: a.spec.job, status: r.report.status,
              fuel_used: r.report.fuel_used, output: r.report.output, wall_ms: r.report.wall_ms }); } catch (_) { /* */ }
            flushResults();
          }
          pump();
        });
      }
    }

    function handle(msg) {
      switch (msg.type) {
        case "assign": {
          const known = new Set([...s.running.keys(), ...s.queue.map((a) => a.lease), ...s.unacked.keys()]);
          for (const a of msg.tasks) {
            if (known.has(a.lease) || s.queue.length >= slots * MAX_QUEUED_PER_SLOT) continue;
            s.queue.push(a);
          }
          pump();
          break;
        }
        case "cancel":
          for (const l of msg.leases) { s.cancelled.add(l); s.unacked.delete(l); }
          while (s.cancelled.size > 4096) s.cancelled.delete(s.cancelled.values().next().value);
          s.queue = s.queue.filter((a) => !s.cancelled.has(a.lease));
          break;
        case "ack":
          for (const l of msg.leases) { s.unacked.delete(l); s.sent.delete(l); }
          refreshStats();
          break;
        case "reject":
          err(new Error("the domain refused a message: " + msg.code + ": " + msg.message));
          break;
        default: break; // drain: reconnect later; welcome/challenge only at the start
      }
    }

    // The node's public stats (credits, reputation), at most every 2 s: an ack asks for a
    // refresh, and the last ask in a burst is served when the window ends.
    let lastStats = -Infinity, trailing = null;
    async function refreshStats(force) {
      const now = performance.now();
      if (!force && now - lastStats < 2000) {
        if (!trailing) trailing = setTimeout(() => { trailing = null; refreshStats(); }, 2000 - (now - lastStats));
        return;
      }
      lastStats = now;
      try {
        const res = await fetch(domain + "/v1/nodes/" + id.id, { cache: "no-store" });
        if (!res.ok) return;
        const n = await res.json();
        const credits = Number(n.credits || 0);
        s.reputation = n.reputation;
        if (credits !== s.credits) { s.credits = credits; try { o.onCredit(credits); } catch (_) { /* */ } }
      } catch (_) { /* the next ack tries again */ }
    }

    // One session; resolves when it closes.
    function session() {
      return new Promise((resolve) => {
        const ws = new WebSocket(sessionBase.replace(/^http/, "ws") + "/v1/nodes/connect");
        ws.binaryType = "arraybuffer";
        s.ws = ws;
        let chain = Promise.resolve(), stage = "challenge";
        ws.onmessage = (ev) => {
          if (typeof ev.data === "string") return;
          const bytes = new Uint8Array(ev.data);
          chain = chain.then(async () => {
            let env;
            try { env = await open(id, bytes, "stardust/v1/domain", MAX_FRAME); } catch (e) { err(e); return; }
            if (stage === "challenge") {
              if (env.message.type !== "challenge") { ws.close(); return; }
              const pinned = await kvGet("pin:" + domain);
              if (pinned && pinned !== env.signer) {
                err(new Error("the domain's key changed from " + pinned + " to " + env.signer + "; refusing it"));
                s.closed = true; ws.close(); return;
              }
              if (!pinned) await kvPut("pin:" + domain, env.signer);
              s.domainKey = env.signer;
              hardware.micro_scu_per_s = s.busyMs > 0 ? Math.round(s.fuel / s.busyMs * 1000 / 1000) : 0;
              await send("stardust/v1/hello", { nonce: env.message.nonce, agent: "stardust-browser/" + VERSION,
                slots, hardware, tier: "browser" });
              stage = "welcome";
              return;
            }
            if (env.signer !== s.domainKey) return;
            if (stage === "welcome") {
              if (env.message.type === "reject") { err(new Error("the domain refused this node: " + env.message.message)); s.closed = true; ws.close(); return; }
              if (env.message.type !== "welcome") { ws.close(); return; }
              stage = "live"; s.connected = true; s.connectedAt = performance.now(); s.sent.clear();
              const every = Math.min(60000, Math.max(100, env.message.heartbeat_ms));
              s.heartbeatTimer = ticker(every, () => { heartbeat().catch(err); });
              heartbeat().catch(err);
              return;
            }
            handle(env.message);
          });
        };
        ws.onclose = () => {
          if (s.connected) s.uptimeMs += performance.now() - s.connectedAt;
          s.connected = false; if (s.heartbeatTimer) s.heartbeatTimer.stop(); s.heartbeatTimer = null; resolve();
        };
        ws.onerror = () => { /* onclose follows */ };
      });
    }
    (async () => {
      for (let backoff = 200; !s.closed;) {
        const started = performance.now();
        await session();
        if (s.closed) break;
        if (performance.now() - started > 10000) backoff = 200;
        err(new Error("disconnected from " + domain + "; reconnecting"));
        await sleep(backoff + Math.random() * backoff / 2);
        backoff = Math.min(backoff * 2, 10000);
      }
    })();

    return {
      id: id.id,
      pause() { setReason("manual", true); },
      resume() { setReason("manual", false); },
      stats() {
        return {
          id: id.id, credits: s.credits, tasks: s.tasks, fuel: s.fuel, reputation: s.reputation,
          uptime_ms: Math.round(s.uptimeMs + (s.connected ? performance.now() - s.connectedAt : 0)),
          connected: s.connected, paused: paused(), reasons: [...s.reasons], running: s.running.size,
          queued: s.queue.length, unacked: s.unacked.size, slots, first_task_ms: s.firstTaskMs, key: id.kind,
          fps: Math.round(s.fps),
        };
      },
      refresh() { return refreshStats(true).then(() => this.stats()); },
      disconnect() {
        s.closed = true;
        clearInterval(policyTimer);
        if (typeof cancelAnimationFrame === "function") cancelAnimationFrame(rafId);
        for (const [t, ev, fn] of listeners) t.removeEventListener(ev, fn);
        if (s.ws) s.ws.close();
        for (const w of s.workers) if (w) w.terminate();
      },
    };
  }

  // Where this script came from: the vendored fallback crypto is fetched from there.
  const scriptBase = (() => {
    try { return new URL(document.currentScript.src).origin; } catch (_) { return null; }
  })();

  global.Stardust = { contribute, run: runLocal, version: VERSION, contentId: C.contentId };
})(typeof self !== "undefined" ? self : this);
