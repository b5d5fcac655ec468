"""The manifest's crash repairs: an unfinished last line, stray temporary files, an interrupted shard merge."""

from __future__ import annotations

import json

from studio import manifest as mf


def line(rid: str, status: str = "ok", **extra) -> bytes:
    return (json.dumps({"id": rid, "status": status, **extra}) + "\n").encode()


def test_unfinished_last_line_is_ignored_then_cut(tmp_path):
    path = tmp_path / mf.MANIFEST
    path.write_bytes(line("a") + line("b") + b'{"id": "c", "stat')            # killed in the middle of a write
    assert [r["id"] for r in mf.read_lines(path)] == ["a", "b"]
    assert mf.repair_tail(path) and path.read_bytes() == line("a") + line("b")
    assert not mf.repair_tail(path)
    mf.append(path, {"id": "c", "status": "ok"})
    assert [r["id"] for r in mf.read_lines(path)] == ["a", "b", "c"]


def test_ok_beats_failed_and_done_ids(tmp_path):
    (tmp_path / mf.MANIFEST).write_bytes(line("a", "failed") + line("a") + line("b", "failed") + line("c"))
    (tmp_path / mf.shard_name(1, 2)).write_bytes(line("d") + line("c", "failed"))
    records = mf.load_records(tmp_path)
    assert {k: v["status"] for k, v in records.items()} == {"a": "ok", "b": "failed", "c": "ok", "d": "ok"}
    assert mf.done_ids(tmp_path) == {"a", "c", "d"}


def test_interrupted_merge_is_redone_without_duplicates(tmp_path):
    main = tmp_path / mf.MANIFEST
    main.write_bytes(line("a"))
    (tmp_path / mf.shard_name(0, 2)).write_bytes(line("b") + line("c"))
    (tmp_path / mf.shard_name(1, 2)).write_bytes(line("d") + line("e", "failed", error="out of memory"))
    main.write_bytes(main.read_bytes() + line("b") + b'{"id": "c"')          # a merge killed half-way
    assert mf.merge_shards(tmp_path) == 3
    assert [r["id"] for r in mf.read_lines(main)] == ["a", "b", "c", "d", "e"]
    assert not list(tmp_path.glob(mf.SHARD_GLOB))
    assert mf.merge_shards(tmp_path) == 0


def test_stale_temp_files_of_atomic_writes_are_removed(tmp_path):
    (tmp_path / "images" / "p").mkdir(parents=True)
    (tmp_path / "grids").mkdir()
    stale = [tmp_path / "images" / "p" / ".x.png.abc123.tmp", tmp_path / "grids" / ".g.png.q.tmp",
             tmp_path / ".manifest.jsonl.r.tmp", tmp_path / ".report.html.s.tmp"]
    keep = [tmp_path / "images" / "p" / "x.png", tmp_path / ".someone-elses.tmp", tmp_path / "notes.txt"]
    for path in stale + keep:
        path.write_bytes(b"x")
    assert mf.remove_stale_temp_files(tmp_path) == len(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
