#!/usr/bin/env bash
# scripts/gpu_bench.sh [OUT_DIR]
#
# The paper-scale DAP throughput of `ncl` and `das` on one CUDA GPU, in one go (about 5 min on
# an H200; every bench call is capped at 4 min): roberta-base (random init, no download), the
# paper's global batch 248 x 164 tokens, SDPA attention, bf16 and fp16 autocast, then eager
# attention in bf16 for comparison. Where 248 does not fit, it retries with micro-batches of
# 124 and 62 accumulated to 248. Writes OUT_DIR/PERFORMANCE-gpu.md (device, versions, commands,
# figures, the projected six-domain das6 DAP time: 2,580 steps x 6 domains + importance) and
# the raw outputs (OUT_DIR/*.txt, *.json). Run from the repository root:
#     bash scripts/gpu_bench.sh results/gpu
# Without CUDA it says so and exits 2 without measuring anything (ALLOW_CPU=1 with small
# SIZE/SEQ/BATCHES/GLOBAL runs the same steps on a CPU, to check the script itself).
set -uo pipefail

OUT=${1:-results/gpu}
STEPS=${STEPS:-10}          # timed DAP steps per repeat
REPEATS=${REPEATS:-3}
IMPORTANCE=${IMPORTANCE:-5} # importance batches timed (scaled to das6's 100)
LIMIT=${LIMIT:-240}         # seconds per bench call
SIZE=${SIZE:-base}          # roberta-base
SEQ=${SEQ:-164}
GLOBAL=${GLOBAL:-248}
BATCHES=${BATCHES:-248 124 62}

if [ "${ALLOW_CPU:-0}" != 1 ] && ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_bench: no CUDA device visible to torch (torch.cuda.is_available() is False);" \
         "nothing measured. On a CPU use: python -m benchmark bench --suite das6" \
         "--random-init --size small" >&2
    exit 2
fi
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false

bench() {  # bench NAME ARGS...: one bench call, batch 248 or the largest of 124, 62 that fits
    local name=$1; shift
    local batch
    for batch in $BATCHES; do
        local cmd=(python -m benchmark bench --suite das6 --random-init --size "$SIZE"
                   --methods ncl,das --steps "$STEPS" --repeats "$REPEATS" --seq-len "$SEQ"
                   --batch "$batch" --global-batch "$GLOBAL" --importance-batches "$IMPORTANCE"
                   --json "$OUT/$name.json" "$@")
        echo "\$ ${cmd[*]}" | tee "$OUT/$name.txt"
        timeout "$LIMIT" "${cmd[@]}" 2> "$OUT/$name.err" | tee -a "$OUT/$name.txt"
        local code=${PIPESTATUS[0]}
        [ "$code" -ne 3 ] && { [ "$code" -ne 0 ] && tail -3 "$OUT/$name.err"; return "$code"; }
        echo "batch $batch does not fit; retrying smaller" | tee -a "$OUT/$name.txt"
    done
}

start=$(date +%s)
bench bf16-sdpa --mixed-precision bf16 --attn sdpa
bench fp16-sdpa --mixed-precision fp16 --attn sdpa
bench bf16-eager --mixed-precision bf16 --attn eager
echo "gpu_bench: measured in $(( $(date +%s) - start )) s"

python - "$OUT" <<'EOF'
import json, subprocess, sys, time
from pathlib import Path

out = Path(sys.argv[1])
runs = [(p.stem, json.loads(p.read_text())) for p in sorted(out.glob("*.json"))]
if not runs:
    sys.exit("gpu_bench: no figures were written; see the .err files")
first = runs[0][1]
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                        text=True).stdout.strip()
lines = [f"# DAP throughput on {first['device']}", "",
         f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
         f"`scripts/gpu_bench.sh` at commit {commit or '?'}; versions: "
         + ", ".join(f"{k} {v}" for k, v in first["versions"].items()) + ".",
         f"random-init RoBERTa ({first['model_params'] / 1e6:.1f} M parameters, no download), "
         f"random token ids, sequences of exactly {first['seq_len']} tokens, global batch "
         f"{first['batch'] * first.get('accumulation', 1)}; model FLOPs as in `benchmark/bench.py` (6·N·T per pass "
         "with gradient + attention; ncl makes 1 pass, das 4).", "",
         "| run | method | micro-batch x accum | s/step (global) | tokens/s | TFLOP/s | MFU | "
         "peak memory | vs ncl | importance share | 6-domain DAP |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
for name, res in runs:
    acc = res.get("accumulation", 1)
    ncl = res["methods"]["ncl"]["median_s"]
    for method, row in res["methods"].items():
        step = row["median_s"]
        tflops = row["flops_per_step"] / step / 1e12
        mfu = f"{100 * tflops / res['peak_tflops']:.1f} %" if res.get("peak_tflops") else "n/a"
        share = ""
        if "importance" in row:
            imp = row["importance"]
            total = imp["kl_proxy_s"] + res["domains"] * (imp["domain_s"] + imp["dap_domain_s"])
            share = f"{100 * (imp['kl_proxy_s'] + res['domains'] * imp['domain_s']) / total:.1f} %"
        lines.append(
            f"| {name} | {method} | {res['batch']} x {acc} | {step * acc:.3f} | "
            f"{row['tokens_per_step'] / step:,.0f} | {tflops:.3g} | {mfu} | "
            f"{row['peak_bytes'] / 2**30:.1f} GiB | {step / ncl:.2f}x | {share} | "
            f"{row['projected_sequence_s'] / 3600:.2f} h |")
lines += ["", "Targets: ncl >= 40 % MFU in bf16; das/ncl <= 3x per step; the six-domain das "
          "DAP sequence in about an hour on one GPU.", "", "## Raw output", ""]
for name, _ in runs:
    lines += [f"### {name}", "", "```", (out / f"{name}.txt").read_text().rstrip(), "```", ""]
(out / "PERFORMANCE-gpu.md").write_text("\n".join(lines))
print("\n".join(lines[:len(runs) * 2 + 12]))
EOF
