#!/usr/bin/env bash
# Throughput and step-cost benchmarks on an accelerator (GPU or TPU), in one short run.
#
#   bash benchmarks/gpu.sh             # on a machine whose JAX default backend is a GPU or TPU
#   BINAX_GPU_SH_ON_CPU=1 bash benchmarks/gpu.sh   # dry run of the same code on the CPU
#
# Writes benchmarks/results/<platform>/ (or $BINAX_GPU_SH_OUT): the integer-path check
# (integer_paths.txt), the main job trained there (train_main_job.txt), the Pallas packed
# product against XLA's dots (pallas_dot.txt), binax.deploy against the float forward
# (inference.json), the optimizer step cost (optimizer_step.{txt,json}) and the training
# throughput, half widths and published widths (throughput*.{md,json}); in that order, the
# quick ones first. Put the figures in BENCHMARKS.md ("Accelerators").
#
# The integer-path check compiles and runs one training step of BinaryNet with every
# combination of arithmetic ('integer': int8 operands, int32 accumulation, which cuDNN runs on
# int8 tensor cores where it can; 'float') and kernel gradient ('patches', 'xla'), checks that
# the integer and float logits are identical, and times each: on a GPU or TPU binax's 'auto'
# takes the float path, and these figures say whether it should take the integer one there.
#
# Each stage runs under its own time limit ($BINAX_GPU_SH_STAGE_S seconds, default 240; the
# process is killed, not only asked to stop) and a failed or timed-out stage is reported and
# skipped, so one slow stage cannot take the others' results with it. $PYTHON picks the
# interpreter (default: python, else python3); on an image whose JAX lives in a virtual
# environment, point it at that environment's python itself, not at a link to it.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-$PWD}" PYTHONUNBUFFERED=1
py="${PYTHON:-$(command -v python || command -v python3)}"
stage_s="${BINAX_GPU_SH_STAGE_S:-240}"
failed=()

stage() {  # stage NAME CMD...: CMD's output to the terminal and to $out/NAME.txt
  echo "== gpu.sh: $1"
  local name=$1
  shift
  timeout -k 10 "$stage_s" "$@" 2>&1 | tee "$out/$name.txt"
  local code=${PIPESTATUS[0]}
  if ((code != 0)); then
    echo "gpu.sh: stage $name failed (exit $code; 124 or 137: over ${stage_s}s)"
    failed+=("$name")
  fi
}

platform=$("$py" -c "import jax; print(jax.default_backend())") || exit 2
if [[ "$platform" == "cpu" && -z "${BINAX_GPU_SH_ON_CPU:-}" ]]; then
  echo "gpu.sh: JAX's default backend is the CPU; run on a GPU/TPU machine" \
       "(or set BINAX_GPU_SH_ON_CPU=1 for a dry run)" >&2
  exit 2
fi
out="${BINAX_GPU_SH_OUT:-benchmarks/results/$platform}"
mkdir -p "$out"
quick=()
[[ "$platform" == "cpu" ]] && quick=(--quick)   # the dry run: small sizes only
stage devices "$py" -c "import jax; print(jax.devices())"

stage integer_paths "$py" - "$platform" <<'PY'
import sys, time
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from binax import models
from binax.train import make_mesh, make_program, optim

batch = 256 if sys.argv[1] != "cpu" else 16
x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, 32, 32, 3)), jnp.float32)
y = jnp.asarray(np.random.default_rng(1).integers(0, 10, batch), jnp.int32)
logits = {}
for arithmetic in ("integer", "float"):
    for kernel_grad in ("patches", "xla"):
        net = models.BinaryNet((32, 32, 3), 10, width_multiplier=0.5, arithmetic=arithmetic,
                               kernel_grad=kernel_grad, rngs=nnx.Rngs(0))
        net.eval()
        logits[arithmetic, kernel_grad] = np.asarray(jax.jit(lambda m, x: m(x))(net, x))
        net.train()
        hp = optim.hparams("bop")
        prog = make_program(net, lambda labels: optim.make_optimizer(
            "bop", hp, "adam", 1e-2, labels, seed=0, steps_per_epoch=1000, total_steps=10**5),
            make_mesh(1))
        state, metrics = prog.init_state(), prog.zero_metrics()
        t0 = time.perf_counter()
        state, metrics = prog.train_step(state, metrics, x, y)
        jax.block_until_ready(state)
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            state, metrics = prog.train_step(state, metrics, x, y)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t0)
        print(f"BinaryNet x0.5 32x32x3 batch {batch}: arithmetic={arithmetic} "
              f"kernel_grad={kernel_grad}: compiled in {compile_s:.1f}s, median step "
              f"{np.median(times) * 1e3:.2f} ms ({batch / np.median(times):.0f} images/s)")
same = all(np.array_equal(logits["integer", k], logits["float", k]) for k in ("patches", "xla"))
print("integer logits == float logits:", same)
assert same
PY

# The README's main job, on the accelerator (the run directory is thrown away).
run_dir=$(mktemp -d)
epochs=20; [[ "$platform" == "cpu" ]] && epochs=1
stage train_main_job "$py" -m binax.train --model mlp --dataset digits --optimizer bop \
  --epochs "$epochs" --run-dir "$run_dir/run" --no-progress
rm -rf "$run_dir"
stage pallas_dot "$py" benchmarks/pallas_dot.py "${quick[@]}"
stage inference "$py" benchmarks/inference.py "${quick[@]}" --out "$out/inference.json"
stage optimizer_step "$py" benchmarks/optimizer_step.py "${quick[@]}" \
  --json "$out/optimizer_step.json"
stage throughput "$py" benchmarks/throughput.py "${quick[@]}" --out "$out/throughput"
if [[ "$platform" != "cpu" ]]; then
  stage throughput_published "$py" benchmarks/throughput.py --published \
    --out "$out/throughput_published"
fi
echo "gpu.sh: results in $out; failed stages: ${failed[*]:-none}"
((${#failed[@]} == 0))
