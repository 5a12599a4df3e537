"""Bar charts of the decode and paged benchmark JSON (time per call, lower is better).

    python -m benchmarks.plot docs/benchmarks      # writes decode.png and paged.png there

prefill.png is written by benchmarks/prefill.py itself.
"""
import argparse
import collections
import json
import os


def _bars(results, mode, impls, title, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = collections.OrderedDict()
    for r in results:
        if r["mode"] != mode or r["impl"] not in impls or r["ms"] is None:
            continue
        c = r["config"]
        times.setdefault(f"B={c['B']}\n{c['L'] // 1024}k", {})[r["impl"]] = r["ms"] * 1e3
    labels = list(times)
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(10, 4))
    for i, impl in enumerate(impls):
        # Each config is scaled by its fastest time, so configs of 30 us and 700 us share an axis.
        ys = [times[l].get(impl, 0) / min(times[l].values()) for l in labels]
        ax.bar([x + i * width for x in range(len(labels))], ys, width, label=impl)
    ax.set_xticks([x + width * (len(impls) - 1) / 2 for x in range(len(labels))], labels)
    ax.set_ylabel("time / fastest (lower is better)")
    ax.set_ylim(0.9, 1.6)
    ax.set_title(f"{title} - {meta['device'].split(' (')[0]}, torch {meta['torch']}, {meta['dtype']}")
    ax.legend(ncol=len(impls), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote", path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", help="holds decode.json / paged.json; the PNGs go there too")
    a = ap.parse_args()
    for name, mode, impls, title in [
        ("decode", "decode", ["fastattn", "sdpa-flash", "sdpa-cudnn", "flex"], "Decode, Hq=32 Hkv=8 D=128"),
        ("paged", "decode", ["contiguous", "paged-16", "paged-128", "flex-paged-128"],
         "Paged decode, Hq=32 Hkv=8 D=128"),
    ]:
        src = os.path.join(a.folder, f"{name}.json")
        if os.path.exists(src):
            with open(src) as f:
                d = json.load(f)
            _bars(d["results"], mode, impls, title, os.path.join(a.folder, f"{name}.png"), d["meta"])


if __name__ == "__main__":
    main()
