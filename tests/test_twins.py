"""The synthetic twins of the papers' datasets (trevor, realtalk, react, vocaset): layouts read back by the readers,
identity, neighbours, the rule ledger and its scorer."""
import json

import numpy as np
import pytest

import data
import metrics


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    root = tmp_path_factory.mktemp("twins")
    return {n: data.generate_twin(n, "tiny", root=root / n) for n in data.TWINS}


def _all(path):
    return {s: data.load_listener(path, s) for s in ("train", "val", "test")}


def test_twins_are_cached_deterministic_and_small(twins, tmp_path):
    for n, p in twins.items():
        meta = json.loads((p / "meta.json").read_text())
        assert meta["twin"] == n and meta["preset"] == "tiny" and meta["mb"] < 20
        assert data.generate_twin(n, "tiny", root=p) == p                     # reused
    again = data.generate_twin("trevor", "tiny", root=tmp_path / "t2")
    for f in ("segments_test.pth", "rules_ledger.json", "mean.npy"):
        assert (again / f).read_bytes() == (twins["trevor"] / f).read_bytes()


def test_resolve_data_names_and_errors(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "DATA_ROOT", tmp_path)
    assert data.resolve_data("trevor", "listener", "smoke") == tmp_path / "trevor-tiny"
    assert (tmp_path / "trevor-tiny" / "segments_train.pth").exists()
    with pytest.raises(data.UserError, match="the trevor twin is a listener dataset"):
        data.resolve_data("trevor", "talking", "smoke")
    with pytest.raises(data.UserError, match="no twin named"):
        data.generate_twin("nope", "tiny")


def test_trevor_one_listener_guests_disjoint(twins):
    items = _all(twins["trevor"])
    betas = np.stack([it["listener_beta"] for s in items.values() for it in s])
    assert np.allclose(betas, betas[0]) and {it["listener_id"] for s in items.values() for it in s} == {0}
    guests = {s: {it["name"].split("_s")[1].split("_")[0] for it in v} for s, v in items.items()}
    assert not (guests["train"] & guests["val"]) and not (guests["train"] & guests["test"])
    assert not (guests["val"] & guests["test"])
    assert all(it["alt_listener"].shape[0] == data.K_ALT for it in items["test"])


def test_realtalk_identities_and_swap(twins):
    import torch
    items = _all(twins["realtalk"])
    train_ids = {it["listener_id"] for it in items["train"]}
    test_ids = {it["listener_id"] for it in items["test"]}
    assert test_ids - train_ids and test_ids & train_ids                  # unseen and held-out seen listeners
    segs = torch.load(twins["realtalk"] / "segments_test.pth", weights_only=True)
    s = segs[0]
    n_swap = min(data.N_SWAP, len(train_ids | test_ids) - 1)              # tiny: fewer identities than N_SWAP
    assert s["swap_listener"].shape == (n_swap, 240, data.MOTION_DIM) and s["swap_beta"].shape[0] == n_swap
    assert int(s["listener_id"]) not in s["swap_ids"].tolist()
    # the swap re-renders the same events with the same timing: the nod (fast pitch) keeps its timing
    own = torch.cat([s["p0_exp"], s["p0_pose"]], 1).numpy()
    other = s["swap_listener"][0].float().numpy()
    hp = lambda x: x - np.convolve(np.pad(x, 4, mode="edge"), np.ones(9) / 9, "valid")
    assert np.corrcoef(hp(own[:, data.PITCH]), hp(other[:, data.PITCH]))[0, 1] > 0.5
    assert not np.allclose(own, other, atol=1e-2)                          # another face style


def test_load_swaps_matches_the_items(twins):
    test = data.load_listener(twins["realtalk"], "test")
    swaps = data.load_swaps(twins["realtalk"], "test")
    assert set(swaps) == {it["name"] for it in test}
    ids, betas, motion = swaps[test[0]["name"]]
    assert motion.shape == (len(ids),) + test[0]["listener"].shape and betas.shape == (len(ids), data.BETA_DIM)
    assert data.load_swaps(twins["trevor"], "test") == {}


def test_ledger_agrees_with_the_items_words(twins):
    """The ledger's humour events are word ends of the items as read back; its pauses follow a word end."""
    for n in ("trevor", "realtalk"):
        items = [it for v in _all(twins[n]).values() for it in v]
        for it, ev in zip(items, data.load_ledger(twins[n], items)):
            ends = {round(e, 3): w for w, e in it["words"]}
            for t in ev["amused"] + ev["sarcasm"]:
                if 0 <= t:
                    assert ends.get(round(t, 3)) in data.HUMOUR_WORDS, (it["name"], t)
            for t in ev["pause"]:
                if 0.5 <= t:
                    assert any(0 < t - e <= 0.11 for e in ends), (it["name"], t)


def test_modality_probes_run(twins):
    import worldtools
    out = worldtools.modality_probes(twins["realtalk"])
    assert set(out["next_second_r2"]) == {"face", "audio", "text", "all"}
    assert set(out["amused_vs_sarcasm"]) >= {"words+face", "words+face+audio"}


def test_react_layout_neighbours_and_roles(twins):
    p = twins["react"]
    items = _all(p)
    for split, its in items.items():
        names = [it["name"] for it in its]
        assert len(names) == len(set(names)) and len(its) % 2 == 0
        sessions = {n.split("/")[1] for n in names}
        assert all(sum(n.split("/")[1] == s for n in names) == 2 for s in sessions)   # each person listens once
        for it in its:                                                    # >= 2 neighbours besides its own pair
            assert it["alt_listener"].shape[0] >= 3 and it["alt_listener"].shape[1:] == it["listener"].shape
    full = np.load(p / data.REACT_APPROPRIATE)
    assert full.shape[0] == 2 * sum(len(v) // 2 for v in items.values())


def test_ledger_round_trip_and_rule_scores(twins):
    gt, rnd, led_all = [], [], []
    for n in ("trevor", "realtalk", "react"):
        items = [it for v in _all(twins[n]).values() for it in v]
        led = data.load_ledger(twins[n], items)
        assert all(e is not None for e in led)
        gt += [it["listener"] for it in items]
        rnd += [np.roll(it["listener"], len(it["listener"]) // 2, 0) for it in items]
        led_all += led
    g = metrics.rule_responses(gt, led_all, data.FPS)
    r = metrics.rule_responses(rnd, led_all, data.FPS)
    for rule in ("pause", "amused", "loud"):
        assert g[f"n_{rule}"] >= 3 and g[rule] >= 0.9 and r[rule] < g[rule] - 0.3, (rule, g, r)
    assert g["n_sarcasm"] >= 1 and g["sarcasm"] < 0.1


def test_vocaset_twin_reads(twins):
    assert len(data.load_talking(twins["vocaset"], "test")) > 0
