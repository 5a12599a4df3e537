#!/usr/bin/env python3
"""Builds a standalone library with only the decode / merge / append_kv CUDA ops
(plus the op schemas), for scripts/dev_decode_check.py --lib: quick to build
(a minute or two for one arch) and independent of the rest of the tree.

    python scripts/build_decode_lib.py [--archs 9.0] [--out build/decode_lib]
    python scripts/dev_decode_check.py --lib build/decode_lib/fastattn_decode.so

Same nvcc flags and FASTATTN_ENABLE_* defines as setup.py (all head dims and
dtypes unless FASTATTN_HDIMS / FASTATTN_DTYPES narrow them).
"""
import argparse
import glob
import os
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ap = argparse.ArgumentParser()
ap.add_argument("--archs", default=os.environ.get("FASTATTN_CUDA_ARCHS", "9.0"))
ap.add_argument("--out", default=os.path.join(ROOT, "build", "decode_lib"))
args = ap.parse_args()

from torch.utils import cpp_extension  # noqa: E402


def env_list(name, default):
    raw = os.environ.get(name, "").replace(";", ",").strip()
    return [x.strip() for x in raw.split(",") if x.strip()] if raw else list(default)


hdims = [int(h) for h in env_list("FASTATTN_HDIMS", (32, 64, 96, 128, 192, 256))]
dtypes = env_list("FASTATTN_DTYPES", ("fp16", "bf16"))
cu = [os.path.join(ROOT, "csrc/cuda", f) for f in ("flash_decode_dispatch.cu", "merge_states.cu", "append_kv.cu")]
cu += sorted(f for f in glob.glob(os.path.join(ROOT, "csrc/cuda/flash_decode_hdim*_*.cu"))
             if int(os.path.basename(f).split("hdim")[1].split("_")[0]) in hdims
             and os.path.basename(f).split("_")[-1][:-3] in dtypes)
cpp = [os.path.join(ROOT, "csrc", f) for f in ("ops.cpp", "attention_problem.cpp", "decode_problem.cpp",
                                                "torch_cuda_decode.cpp")]
defines = [f"-DFASTATTN_ENABLE_HDIM{h}" for h in hdims] + [f"-DFASTATTN_ENABLE_{d.upper()}" for d in dtypes]
defines += ["-DFASTATTN_WITH_CUDA"]
arch_flags = []
for a in args.archs.replace(",", ";").split(";"):
    n = a.strip().replace(".", "")
    if n:
        arch_flags.append(f"-gencode=arch=compute_{n},code=sm_{n}")
tmp = os.path.join(args.out, "obj")
os.makedirs(tmp, exist_ok=True)
path = cpp_extension.load(
    name="fastattn_decode",
    sources=cpp + cu,
    extra_include_paths=[os.path.join(ROOT, "csrc")],
    extra_cflags=["-O3", "-std=c++17"] + defines,
    extra_cuda_cflags=["-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr",
                       "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                       "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                       "-lineinfo", "-Xptxas=-v"] + arch_flags + defines,
    build_directory=tmp,
    is_python_module=False,
    verbose=os.environ.get("VERBOSE") == "1",
)
so = os.path.join(tmp, "fastattn_decode.so")
dst = os.path.join(args.out, "fastattn_decode.so")
shutil.copy2(so, dst)
print(f"built {dst} ({os.path.getsize(dst) / 2**20:.1f} MiB; hdims {hdims}, dtypes {dtypes}, archs {args.archs})")
