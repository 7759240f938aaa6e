"""cluster/journal.py: what is saved loads back as the same plain data (tuples as lists, int
keys as ints), a crash mid-save never corrupts the last snapshot, blobs sit beside it, clear()
forgets everything, a snapshot of another format is refused, and `update` writes one owner's
parts (or entries of a part) while keeping the other owner's.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest
import torch

from moefleet.cluster.journal import Journal
from moefleet.cluster.registry import ExpertRecord, ModelRecord
from tests.specs import family_spec

pytestmark = pytest.mark.unit


def _state(seed: int) -> dict:
    """Nested plain data of every kind the Controller writes, with fresh values."""
    g = torch.Generator().manual_seed(seed)
    rate = torch.rand(1, generator=g).item() + 0.1
    n = int(torch.randint(2, 1 << 40, (1,), generator=g))
    return {
        "models": {"m": {"version": n, "replicas": [[1, 0, "h0", 3], [3, 7, "h1", 0]],
                         "load": {7: rate, 12: -rate}, "ok": True, "file": None}},
        "hosts": [{"id": "h0", "info": {"slots_total": 16, "node_ip": "10.0.0.1"},
                   "slots": [[0, 1, 0]]}],
        "policy": {"m": {"pending": {3: (2, rate * 100)}}},
        "blob": os.urandom(33),
    }


def test_save_then_load_gives_the_same_plain_data_with_tuples_as_lists(tmp_path: Path) -> None:
    state = _state(seed=1)
    want = {**state, "policy": {"m": {"pending": {3: [2, state["policy"]["m"]["pending"][3][1]]}}}}
    journal = Journal(tmp_path)
    journal.save(state)
    got = journal.load()
    assert got == want
    assert list(got["models"]["m"]["load"]) == [7, 12]  # int keys stay ints
    assert isinstance(got["blob"], bytes) and got["blob"] == state["blob"]
    assert got["models"]["m"]["load"][7] == state["models"]["m"]["load"][7]  # float64, exact


def test_a_new_journal_on_the_same_dir_reads_the_last_snapshot(tmp_path: Path) -> None:
    first, second = _state(seed=2), _state(seed=3)
    Journal(tmp_path).save(first)
    Journal(tmp_path).save(second)
    assert Journal(tmp_path).load()["blob"] == second["blob"]  # a restarted Controller's view


def test_load_is_none_when_nothing_was_saved(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "state" / "deeper")  # the directory is made as needed
    assert journal.load() is None
    assert journal.dir.is_dir()


def test_a_leftover_tmp_file_from_an_interrupted_save_does_not_break_load(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    state = _state(seed=4)
    journal.save(state)
    (tmp_path / "registry.tmp").write_bytes(b"\x93half a snap")  # a crash before the rename
    assert journal.load()["blob"] == state["blob"]
    newer = _state(seed=5)
    journal.save(newer)  # the next save overwrites the leftover
    assert journal.load()["blob"] == newer["blob"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry.msgpack"]


def test_write_blob_stores_the_bytes_beside_the_snapshot_and_returns_their_path(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    data = os.urandom(1000)
    path = journal.write_blob("m-1-8.safetensors", data)
    assert Path(path) == tmp_path / "m-1-8.safetensors"
    assert Path(path).read_bytes() == data
    newer = os.urandom(500)
    assert journal.write_blob("m-1-8.safetensors", newer) == path
    assert Path(path).read_bytes() == newer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-1-8.safetensors"]


def test_clear_removes_the_snapshot_and_the_blobs(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.save(_state(seed=6))
    journal.write_blob("a.safetensors", os.urandom(8))
    (tmp_path / "sub").mkdir()  # directories are not the journal's
    journal.clear()
    assert journal.load() is None
    assert [p.name for p in tmp_path.iterdir()] == ["sub"]
    journal.save({"after": 1})  # and it keeps working
    assert journal.load() == {"after": 1}


@pytest.mark.parametrize(("snapshot", "found"), [({"format": 2, "state": {}}, "2"),
                                                 ({"state": {}}, "None")], ids=["format-2", "no-format"])
def test_a_snapshot_of_another_format_raises_value_error(tmp_path: Path, snapshot: dict, found: str) -> None:
    journal = Journal(tmp_path)
    journal.path.write_bytes(msgpack.packb(snapshot))
    with pytest.raises(ValueError, match=f"journal format {found}, expected 1"):
        journal.load()


def test_a_model_records_snapshot_survives_the_journal(tmp_path: Path) -> None:
    spec = family_spec("deepseek_v3")
    g = torch.Generator().manual_seed(7)
    experts = {L: {e: ExpertRecord(torch.randn(64, generator=g), 0.01 * e, e // 4) for e in range(16)}
               for L in spec.layers}
    model = ModelRecord(spec, experts, {L: None for L in spec.layers}, spec.autoscaling)
    del model.experts[3][9]
    model.experts[3][16] = ExpertRecord(torch.randn(64, generator=g), 0.5, 2,
                                        file=str(tmp_path / "e16.safetensors"))
    model.replicas = {(3, 16): [("h1", 4)]}
    model.target = {(3, 16): 1}
    plain = model.to_plain()
    journal = Journal(tmp_path)
    journal.save({"models": {spec.name: plain}})
    assert journal.load() == {"models": {spec.name: plain}}


def test_only_the_owner_may_read_the_snapshot_it_holds_the_data_plane_secret(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.save({**_state(seed=4), "dataplane_secret": "s3cret"})
    assert journal.path.stat().st_mode & 0o777 == 0o600
    assert journal.load()["dataplane_secret"] == "s3cret"


def test_update_replaces_its_parts_and_entries_and_keeps_the_other_owners(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.update(models={"a": {"version": 1}, "b": {"version": 1}}, policy={"a": {"pending": []}})
    journal.update(entries={"models": {"b": {"version": 2}}}, hosts=[{"id": "h0"}], dataplane_secret="s")
    journal.update(policy={})  # a part given whole replaces the last one
    want = {"models": {"a": {"version": 1}, "b": {"version": 2}}, "policy": {},
            "hosts": [{"id": "h0"}], "dataplane_secret": "s"}
    assert journal.load() == want
    again = Journal(tmp_path)  # a restarted Controller's journal updates what it loaded
    again.load()
    again.update(entries={"models": {"c": {"version": 1}}})
    assert Journal(tmp_path).load() == {**want, "models": {**want["models"], "c": {"version": 1}}}
    again.clear()
    again.update(hosts=[])
    assert again.load() == {"hosts": []}
