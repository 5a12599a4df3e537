"""Pictures of a BlockMask: text (one character per block) and PNG."""
from __future__ import annotations

import torch

_CHARS = {0: "·", 1: "░", 2: "█"}


def block_picture(bm, batch: int = 0, head: int = 0, max_blocks: int = 64) -> str:
    """Rows = query blocks, columns = KV blocks: █ full, ░ partial, · skipped.
    Larger masks are shown subsampled to at most max_blocks per side."""
    st = bm.block_states()
    b = min(batch, st.shape[0] - 1)
    h = min(head, st.shape[1] - 1)
    grid = st[b, h].cpu()
    qb, kb = grid.shape
    rs = max(1, -(-qb // max_blocks))
    cs = max(1, -(-kb // max_blocks))
    if rs > 1 or cs > 1:  # a sampled cell shows the strongest state it covers
        grid = torch.nn.functional.max_pool2d(grid[None, None].float(), (rs, cs), ceil_mode=True)[0, 0].to(torch.uint8)
    lines = ["".join(_CHARS[int(x)] for x in row) for row in grid.tolist()]
    note = f" (every {rs}x{cs} blocks)" if rs > 1 or cs > 1 else ""
    head_line = (f"{qb}x{kb} blocks of {bm.BLOCK_SIZE[0]}x{bm.BLOCK_SIZE[1]}{note}; "
                 f"█ full ░ partial · skipped; density {100 * bm.density():.1f}%")
    return "\n".join([head_line] + lines)


def save_png(bm, path, batch: int = 0, head: int = 0, elements: bool = False):
    """Block states (or, with elements=True, the element mask; small sizes) as an image."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if elements:
        img = bm.to_element_mask()[min(batch, bm.shape[0] - 1), min(head, bm.shape[1] - 1)].float().cpu()
        title = f"element mask {tuple(img.shape)}"
    else:
        img = bm.block_states()[min(batch, bm.shape[0] - 1), min(head, bm.shape[1] - 1)].float().cpu() / 2
        title = f"blocks {bm.BLOCK_SIZE}: dark = full, grey = partial"
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(img.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("key block" if not elements else "key")
    ax.set_ylabel("query block" if not elements else "query")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
