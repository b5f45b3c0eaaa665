#!/usr/bin/env bash
# Compare vncd's builtin proxy (`vncd-proxy`, what `vncd run` starts when installed beside
# it) with websockify 0.13 (PyPI) on this machine, in one run.
#
#   benches/proxy-vs-websockify.sh [N] [LATENCY_SAMPLES] [THROUGHPUT_MIB]
#
# For each kind, one kind at a time:
#   1. start N proxies one after another against one QEMU VNC server, timing each from spawn
#      until its port shows up as LISTEN in /proc/net/tcp (what a supervisor waits for);
#   2. with all N idle, sum Pss/Rss from /proc/PID/smaps_rollup (websockify: parent plus any
#      children; idle it has none);
#   3. connection setup latency through proxy #1: websocket connect (subprotocol binary) plus
#      the 12-byte RFB banner from QEMU, LATENCY_SAMPLES times, sequentially; then the extra PSS
#      per open session with 50 sessions held open at once through proxy #1;
#   4. bulk throughput through one websocket, both directions, THROUGHPUT_MIB each, median of 3
#      runs (the machine is shared, so single runs are noisy). The target
#      is NOT QEMU here but a tiny Python TCP source/sink (QEMU cannot push bulk data on demand).
# The websocket client is examples/wsbench.rs (Rust, tokio-tungstenite), the same for both kinds.
# Requires: cargo, python3 with `pip install websockify==0.13.0`, qemu-system-x86_64.
# Only loopback is used. Every process started here is ended by pid / process group on exit.
set -euo pipefail

N=${1:-100}
LAT=${2:-50}
MIB=${3:-256}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

command -v qemu-system-x86_64 >/dev/null || { echo "need qemu-system-x86_64 (apt-get install qemu-system-x86)" >&2; exit 1; }
WSV=$(python3 -c 'import importlib.metadata as m; print(m.version("websockify"))' 2>/dev/null || true)
[ "$WSV" = "0.13.0" ] || { echo "need websockify 0.13.0 from PyPI (pip install websockify==0.13.0), found '${WSV:-none}'" >&2; exit 1; }

echo "# building release vncd and examples/wsbench ..." >&2
(cd "$ROOT" && cargo build --quiet --release --bin vncd --bin vncd-proxy --example wsbench)
VNCD=$CARGO_TARGET_DIR/release/vncd-proxy
WSBENCH=$CARGO_TARGET_DIR/release/examples/wsbench

WORK=$(mktemp -d)
BG_PIDS=()
cleanup() {
    for pid in "${BG_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${BG_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

cat >"$WORK/targets.py" <<'PY'
# Bulk TCP targets: "source" sends BYTES then closes; "sink" reads BYTES then closes.
import socket, socketserver, sys, threading
mode, port, nbytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
class H(socketserver.BaseRequestHandler):
    def handle(self):
        s = self.request
        if mode == "source":
            buf = b"\xa5" * (1 << 20); left = nbytes
            while left > 0:
                n = min(left, len(buf)); s.sendall(buf[:n]); left -= n
        else:
            left = nbytes
            while left > 0:
                b = s.recv(1 << 20)
                if not b: break
                left -= len(b)
        s.shutdown(socket.SHUT_RDWR)
class S(socketserver.ThreadingTCPServer):
    allow_reuse_address = True; daemon_threads = True
S(("127.0.0.1", port), H).serve_forever()
PY

cat >"$WORK/fleet.py" <<'PY'
# One kind of proxy: spawn time, PSS at N, connect latency, throughput. Prints key=value lines.
import os, signal, socket, statistics, subprocess, sys, time
kind, n, vnc, src, sink, mib, lat, vncd, wsbench = sys.argv[1:10]
n, mib, lat = int(n), int(mib), int(lat)
sessions = 50

def free_ports(k):
    socks = []
    for _ in range(k):
        s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks: s.close()
    return ports

def listening(port):
    want = ":%04X" % port
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            p = line.split()
            if p[3] == "0A" and p[1].endswith(want):
                return True
    return False

def command(port, target):
    if kind == "vncd":
        return [vncd, "--listen", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{target}"]
    return [sys.executable, "-m", "websockify", f"127.0.0.1:{port}", f"127.0.0.1:{target}"]

procs = []
def start(port, target):
    t0 = time.perf_counter()
    p = subprocess.Popen(command(port, target), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    procs.append(p)
    while not listening(port):
        if p.poll() is not None:
            raise SystemExit(f"{kind} on port {port} exited with {p.returncode}")
        if time.perf_counter() - t0 > 15:
            raise SystemExit(f"{kind} on port {port} never listened")
        time.sleep(0.0005)
    return time.perf_counter() - t0

def stop_all():
    for p in procs:
        try: os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError: pass
    for p in procs:
        try: p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL); p.wait()
    procs.clear()

def tree(pid):
    out = [pid]
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                for c in f.read().split(): out += tree(int(c))
    except FileNotFoundError:
        pass
    return out

def rollup(pid):
    vals = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, _, rest = line.partition(":")
                if k in ("Pss", "Rss"): vals[k] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass  # a websockify child that just exited
    return vals.get("Pss", 0), vals.get("Rss", 0)

def wsb(*args):
    out = subprocess.run([wsbench, *args], check=True, capture_output=True, text=True, timeout=300).stdout
    return dict(kv.split("=") for kv in out.split())

try:
    ports = free_ports(n)
    spawn = [start(p, vnc) for p in ports]
    time.sleep(2)  # let every process settle before measuring memory
    pss = rss = nproc = 0
    for p in procs:
        for pid in tree(p.pid):
            a, b = rollup(pid); pss += a; rss += b; nproc += 1
    print(f"spawn_ms_median={statistics.median(spawn)*1000:.1f}")
    print(f"spawn_ms_max={max(spawn)*1000:.1f}")
    print(f"pss_kib_per_proxy={pss/n:.0f}")
    print(f"rss_kib_per_proxy={rss/n:.0f}")
    print(f"pss_mib_total={pss/1024:.1f}")
    print(f"os_processes={nproc}")
    r = wsb("latency", f"ws://127.0.0.1:{ports[0]}/", str(lat))
    print(f"connect_banner_ms_median={r['median_ms']}")
    print(f"connect_banner_ms_p90={r['p90_ms']}")
    # Many sessions in one proxy: PSS of proxy #1 (and its children) idle vs with SESSIONS open.
    time.sleep(1)  # websockify's per-connection children from the latency run must be gone
    idle_pss = sum(rollup(pid)[0] for pid in tree(procs[0].pid))
    holder = subprocess.Popen([wsbench, "hold", f"ws://127.0.0.1:{ports[0]}/", str(sessions)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding", "wsbench hold failed"
        time.sleep(1)
        tree_pids = tree(procs[0].pid)
        busy_pss = sum(rollup(pid)[0] for pid in tree_pids)
        print(f"pss_kib_per_session={(busy_pss - idle_pss) / sessions:.0f}")
        print(f"os_processes_for_{sessions}_sessions={len(tree_pids)}")
    finally:
        holder.stdin.close(); holder.wait(timeout=30)
    stop_all()
    a, b = free_ports(2)
    start(a, src); start(b, sink)
    nbytes = str(mib << 20)
    # Three runs per direction (the machine is shared): report the median.
    downs = [wsb('down', f'ws://127.0.0.1:{a}/', nbytes) for _ in range(3)]
    ups = [float(wsb('up', f'ws://127.0.0.1:{b}/', nbytes)['mib_per_s']) for _ in range(3)]
    print(f"down_mib_per_s={statistics.median(float(d['mib_per_s']) for d in downs):.1f}")
    print(f"down_avg_frame_kib={downs[0]['avg_frame_kib']}")
    print(f"up_mib_per_s={statistics.median(ups):.1f}")
finally:
    stop_all()
PY

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# One QEMU VNC server for every proxy.
VNC=""
for _ in 1 2 3 4 5; do
    port=$(free_port)
    qemu-system-x86_64 -display none -nodefaults -machine none -vnc "127.0.0.1:$((port - 5900))" \
        </dev/null >/dev/null 2>&1 &
    qpid=$!
    if python3 - "$port" <<'PY'
import socket, sys, time
for _ in range(200):
    try:
        s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
        if s.recv(12) == b"RFB 003.008\n": sys.exit(0)
    except OSError: pass
    time.sleep(0.05)
sys.exit(1)
PY
    then VNC=$port; BG_PIDS+=("$qpid"); break; fi
    kill "$qpid" 2>/dev/null || true; wait "$qpid" 2>/dev/null || true
done
[ -n "$VNC" ] || { echo "could not start QEMU" >&2; exit 1; }

SRC=$(free_port); SINK=$(free_port)
python3 "$WORK/targets.py" source "$SRC" $((MIB << 20)) & BG_PIDS+=("$!")
python3 "$WORK/targets.py" sink "$SINK" $((MIB << 20)) & BG_PIDS+=("$!")
sleep 0.5

echo "# $(date -u +%FT%TZ) $(uname -r) cores=$(nproc) N=$N latency_samples=$LAT throughput=${MIB}MiB/direction"
echo "# vncd: $("$VNCD" --version 2>/dev/null || echo vncd) ($(du -h "$VNCD" | cut -f1) binary), websockify $WSV on $(python3 --version)"
echo "# targets: QEMU VNC 127.0.0.1:$VNC for spawn/memory/latency; Python TCP source/sink for throughput"
for kind in vncd websockify; do
    echo "# running $kind ..." >&2
    python3 "$WORK/fleet.py" "$kind" "$N" "$VNC" "$SRC" "$SINK" "$MIB" "$LAT" "$VNCD" "$WSBENCH" \
        | sed "s/^/$kind./" | tee "$WORK/$kind.out"
done

python3 - "$WORK/vncd.out" "$WORK/websockify.out" <<'PY'
import sys
def load(p): return {l.split("=")[0].split(".", 1)[1]: float(l.split("=")[1]) for l in open(p) if "=" in l}
v, w = load(sys.argv[1]), load(sys.argv[2])
print("# ratios builtin/websockify (lower is better for time and memory, higher for throughput)")
for k in ("pss_kib_per_proxy", "rss_kib_per_proxy", "spawn_ms_median", "connect_banner_ms_median",
          "pss_kib_per_session",
          "down_mib_per_s", "up_mib_per_s"):
    print(f"ratio.{k}={v[k] / w[k]:.3f}   (vncd {v[k]:g} / websockify {w[k]:g})")
PY
