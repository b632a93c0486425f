"""The target-model table: fixed-capacity memories, rows batched bit for bit as one at a time,
rows handed back and reused, state buffers that keep their storage."""
from __future__ import annotations

import numpy as np
import torch

from models.target_model import TargetModelConfig, TargetModelTable

C_IN, FEATURE, LABEL = 8, (8, 14), (120, 216)  # a test-size frame: its encodings batch bit for bit
CONFIG = TargetModelConfig(channels=96, init_iters=(3, 2), update_iters=(3,), memory_size=6, train_skipping=2,
                           min_update_pixels=0)
STATE = ("theta", "samples", "metrics", "targets", "current", "direction", "rho", "residual")


def table() -> TargetModelTable:
    return TargetModelTable(C_IN, CONFIG, FEATURE, LABEL)


def first_frame(seed: int, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, C_IN, *FEATURE, generator=g), (torch.rand(k, 1, *LABEL, generator=g) > 0.6).float()


def frames(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(layer4 (1, C, h, w), soft mask (1, 1, H, W)) per frame."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, C_IN, *FEATURE, generator=g), torch.rand(1, 1, *LABEL, generator=g)) for _ in range(n)]


def track(t: TargetModelTable, rows: list[int], sequences: list[list[tuple]]) -> list[torch.Tensor]:
    """Score and update the rows together on their own frames -> the scores per frame (N, 1, h, w)."""
    out = []
    for step in zip(*sequences):
        scores = t.scores(rows, torch.cat([f for f, _ in step]))
        t.update(rows, torch.cat([m for _, m in step]), [True] * len(rows))
        out.append(scores)
    return out


def test_rows_together_equal_one_at_a_time_bit_for_bit():
    """What lockstep tracking relies on: an object's target model does not depend on which other
    objects share its batched scores, inserts and optimizer runs (DAVIS PNGs of --batch-sequences 2
    are byte-identical to one sequence at a time)."""
    n_frames = 2 * CONFIG.memory_size  # the memories fill and then replace samples
    sequences = [frames(n_frames, seed) for seed in (1, 2)]
    together = table()
    rows = [together.add([f], [m])[0] for f, m in (first_frame(10), first_frame(11))]
    batched = track(together, rows, sequences)
    assert together.sizes[rows].tolist() == [CONFIG.memory_size] * 2
    for i, seed in enumerate((10, 11)):
        alone = table()
        f, m = first_frame(seed)
        row = alone.add([f], [m])
        single = track(alone, row, [sequences[i]])
        for a, b in zip(batched, single):
            assert torch.equal(a[i], b[0])
        for name in STATE:
            assert torch.equal(getattr(together, name)[rows[i]], getattr(alone, name)[row[0]]), name
        assert np.array_equal(together.host_weights[rows[i]], alone.host_weights[row[0]])


def test_memory_fills_in_order_then_replaces_the_lowest_weight():
    t = table()
    (row,) = t.add(*zip(first_frame(0)))
    k = 3
    assert t.sizes[row] == k and not t.host_weights[row, k:].any()
    slots = []
    for layer4, mask in frames(CONFIG.memory_size, 5):
        lowest = int(t.host_weights[row].argmin())
        t.scores([row], layer4)
        t.update([row], mask, [True])
        slots.append(int(t.last_slot[row]))
        assert slots[-1] == lowest
        assert torch.equal(t.samples[row, slots[-1]], t.current[row])
        assert abs(float(t.host_weights[row].sum()) - 1) < 1e-6
    # the empty slots in order, then (memory full) replacements of filled ones
    assert slots[:CONFIG.memory_size - k] == list(range(k, CONFIG.memory_size))
    assert all(slot < CONFIG.memory_size for slot in slots[CONFIG.memory_size - k:])
    assert t.sizes[row] == CONFIG.memory_size and (t.host_weights[row] > 0).all()


def test_state_buffers_keep_their_storage_across_frames():
    """Scores, inserts and optimizer runs write into the table's buffers: a frame allocates no
    new state (what a captured graph or a compiled region with persistent buffers needs)."""
    t = table()
    rows = [t.add([f], [m])[0] for f, m in (first_frame(0), first_frame(1))]
    pointers = {name: getattr(t, name).data_ptr() for name in STATE}
    track(t, rows, [frames(5, 3), frames(5, 4)])
    assert {name: getattr(t, name).data_ptr() for name in STATE} == pointers


def test_released_rows_are_reused_and_start_clean():
    """A row handed back is taken by the next object; what the previous object left in it does
    not change the new one's results."""
    t = table()
    first = t.add(*zip(first_frame(0)))
    track(t, first, [frames(2 * CONFIG.memory_size, 3)])
    t.release(first)
    again = t.add(*zip(first_frame(7)))
    assert again == first
    fresh = table()
    row = fresh.add(*zip(first_frame(7)))
    sequence = frames(4, 8)
    for a, b in zip(track(t, again, [sequence]), track(fresh, row, [sequence])):
        assert torch.equal(a, b)


def test_table_grows_keeping_its_rows():
    t = table()
    rows = [t.add(*zip(first_frame(i)))[0] for i in range(3)]
    assert rows == [0, 1, 2] and t.capacity >= 3
    before = t.theta[:3].clone()
    t.add([first_frame(5)[0]] * 3, [first_frame(5)[1]] * 3)
    assert t.capacity >= 6 and torch.equal(t.theta[:3], before)


def test_rows_with_different_fill_counts_batch_bit_for_bit():
    """A row's optimizer run does not depend on how many samples its batch companions hold."""
    sequences = [frames(4, seed) for seed in (1, 2)]
    enough = [[True] * 4, [True, False, False, True]]  # the second object lacks foreground twice
    together = table()
    rows = [together.add([f], [m])[0] for f, m in (first_frame(10), first_frame(11))]
    alone = [table(), table()]
    alone_rows = [alone[0].add(*zip(first_frame(10))), alone[1].add(*zip(first_frame(11)))]
    for t, ((f0, m0), (f1, m1)) in enumerate(zip(*sequences)):
        together.scores(rows, torch.cat([f0, f1]))
        together.update(rows, torch.cat([m0, m1]), [enough[0][t], enough[1][t]])
        for i, (f, m) in enumerate(((f0, m0), (f1, m1))):
            alone[i].scores(alone_rows[i], f)
            alone[i].update(alone_rows[i], m, [enough[i][t]])
        if t == 3:  # both re-optimized together, holding 3 + 4 and 3 + 2 samples
            assert together.sizes[rows].tolist() == [6, 5]
    for i in range(2):
        for name in STATE:
            assert torch.equal(getattr(together, name)[rows[i]], getattr(alone[i], name)[alone_rows[i][0]]), name


def test_static_shapes_equal_the_filled_prefix():
    """`static_shapes` (what --compile uses): a power-of-two number of rows per score and
    optimizer run, every slot per optimizer run, the padding discarded; in eager the same
    numbers, bit for bit."""
    sequences = [frames(4, seed) for seed in (1, 2, 3)]
    tables = [table(), TargetModelTable(C_IN, CONFIG, FEATURE, LABEL, static_shapes=True)]
    runs = []
    for t in tables:
        rows = t.add(*zip(*(first_frame(seed) for seed in (10, 11, 12))))
        runs.append(track(t, rows, sequences))  # three rows: a bucket of four
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    for name in STATE:
        assert torch.equal(getattr(tables[0], name)[:3], getattr(tables[1], name)[:3]), name


def test_an_insert_sends_only_the_rows_it_changed(monkeypatch):
    """Off the CPU the sample weights live in a device copy of the host table: an insert copies
    the rows it changed, not the whole table (on the CPU the copy is a view: nothing is sent)."""
    import models.target_model as target_model

    t = table()
    rows = [t.add([f], [m])[0] for f, m in (first_frame(seed) for seed in (20, 21, 22, 23))]
    t.scores(rows, frames(1, 5)[0][0])
    sent = []
    monkeypatch.setattr(target_model, "to_device", lambda x, device: sent.append(tuple(x.shape)) or x)
    t.device = torch.device("meta")  # any device but the CPU
    t.weights = t.weights.clone()  # the device copy
    masks = torch.rand(2, 1, *LABEL, generator=torch.Generator().manual_seed(6))
    metrics, targets = t.upsampling.encode(masks, torch.ones_like(masks))
    t.insert([rows[1], rows[3]], metrics, targets)
    assert (2, CONFIG.memory_size) in sent and all(shape[0] <= 2 for shape in sent), sent
    assert torch.equal(t.weights, torch.from_numpy(t.host_weights))  # the copy is up to date
