"""Processes adding and removing photos while others read the matrix file: never a stale, missing or torn matrix."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

WRITER = textwrap.dedent(
    """
    import sqlite3, sys, time
    import numpy as np
    from pathlib import Path
    from sdltag.index import ImageIndex

    db, first, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    with ImageIndex.open(db, commit_every=1000) as index:
        for i in range(first, first + count):
            index.put(Path(f"/nowhere/{i}.jpg"), 1, 1, f"h{i}", "m", np.full((3, 8), i, dtype=np.float32))
            if i % 5 == 4:
                index.commit()
            if i % 25 == 24:  # another program removes and replaces rows: the counters move, the file is stale
                conn = sqlite3.connect(db, timeout=30)
                conn.execute("DELETE FROM images WHERE path = ?", (f"/nowhere/{i - 20}.jpg".encode(),))
                conn.commit()
                conn.close()
                index.put(Path(f"/nowhere/{i - 10}.jpg"), 2, 2, "x", "m", np.full((3, 8), i - 10, dtype=np.float32))
            time.sleep(0.002)
    """
)

READER = textwrap.dedent(
    """
    import sqlite3, sys, time
    import numpy as np
    from pathlib import Path
    from sdltag import matrixfile
    from sdltag.index import ImageIndex

    db, seconds, update = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "1"

    def committed():
        conn = sqlite3.connect(db, timeout=30)
        try:
            return {int(np.frombuffer(v, dtype="<f4")[0]) for (v,) in conn.execute("SELECT vectors FROM images")}
        finally:
            conn.close()

    views = tails = 0
    seen = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        before = committed()
        seen |= before
        with ImageIndex.open_readonly(db) as index:
            view = matrixfile.load(index, "m", update=update)
        after = committed()
        if view is None:
            continue
        if not len(view):
            continue
        matrices = view.vectors(0, len(view))
        firsts = matrices[:, 0, 0]
        assert (matrices == firsts[:, None, None]).all(), "a torn matrix"
        values = [int(v) for v in np.rint(firsts)]
        assert len(values) == len(set(values)), "a matrix twice"
        removed = seen - before  # committed once, gone before this read began (a removed value never comes back)
        assert not removed & set(values), f"a removed matrix: {sorted(removed & set(values))[:5]}"
        assert before & after <= set(values), f"a missing matrix: {sorted((before & after) - set(values))[:5]}"
        assert len(view.rowids) == len(set(view.rowids.tolist())) == len(values)
        views += 1
        tails += bool(len(view.tail_ids))
    print("VIEWS", views, tails)
    """
)


def test_concurrent_writers_and_readers_never_see_a_stale_or_torn_file(tmp_path: Path) -> None:
    db = tmp_path / "index.db"
    subprocess.run([sys.executable, "-c", WRITER, str(db), "1", "1"], check=True)  # the schema, one row
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(first), "300"], stderr=subprocess.PIPE, text=True)
        for first in (2, 1001)
    ]
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(db), "6", update],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for update in ("1", "1", "0")
    ]
    for writer in writers:
        _, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err
    counts = []
    for reader in readers:
        out, err = reader.communicate(timeout=300)
        assert reader.returncode == 0, err
        counts.append([int(x) for x in out.split()[1:]])
    assert all(views > 0 for views, _ in counts), counts
    assert sum(tails for _, tails in counts) > 0, counts  # some reads took added rows from SQLite
