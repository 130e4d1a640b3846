"""The contract between the Lua scripts and the Python side: one vocabulary (event types,
states, outcomes) and one set of key names, checked rather than claimed in comments."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

from downloader.events import EVENT_TYPES
from downloader.ids import new_job_id
from downloader.jobs import CallbackJob, ClaimedJob, Job
from downloader.storage import Keys
from downloader.vocabulary import (
    CallbackOutcome,
    CallbackState,
    DownloadOutcome,
    DownloadState,
    EventType,
    FileState,
)
from harness.redis_nodes import StrRedis

SCRIPTS = Path(str(resources.files("downloader") / "scripts"))


def lua_sources() -> dict[str, str]:
    """Each script's code, comments stripped (a comment may name anything)."""
    return {p.name: re.sub(r"--[^\n]*", "", p.read_text()) for p in sorted(SCRIPTS.glob("*.lua"))}


def literals(code: str) -> set[str]:
    return set(re.findall(r"'([^'\n]*)'", code))


def test_every_event_type_a_script_writes_is_known_to_python() -> None:
    """A Lua script can emit only event types of EventType, each with its event class."""
    known = {t.value for t in EventType}
    written = {
        lit
        for code in lua_sources().values()
        for lit in literals(code)
        if re.fullmatch(r"(job|download|callback|file)\.[a-z_]+", lit)
    }
    assert written, "no event type found in the scripts"
    assert written <= known, written - known
    assert set(EVENT_TYPES) == known


def test_the_fold_has_a_branch_for_every_event_type() -> None:
    """prelude.lua's fold handles every EventType, and no type Python does not know."""
    prelude = lua_sources()["prelude.lua"]
    fold = prelude[prelude.index("local function fold(") : prelude.index("local function settled")]
    branches = re.findall(r"etype == '([^']+)'", fold)
    assert sorted(branches) == sorted(t.value for t in EventType)


def test_outcomes_the_scripts_take_are_the_python_outcomes() -> None:
    """finish.lua and callback_end.lua map exactly the outcomes Python records to events."""
    sources = lua_sources()
    for script, enum in (("finish.lua", DownloadOutcome), ("callback_end.lua", CallbackOutcome)):
        table = re.search(r"OUTCOME_EVENT = \{(.*?)\}", sources[script], re.S)
        assert table is not None, script
        mapped = dict(re.findall(r"(\w+) = '([^']+)'", table.group(1)))
        assert set(mapped) == {o.value for o in enum}, script
        assert set(mapped.values()) <= {t.value for t in EventType}, script


def test_states_in_the_scripts_are_the_python_states() -> None:
    """Every state a script writes or compares is a DownloadState/CallbackState/FileState."""
    states = {s.value for s in DownloadState} | {s.value for s in CallbackState}
    files = {s.value for s in FileState}
    for name, code in lua_sources().items():
        capitalised = {lit for lit in literals(code) if re.fullmatch(r"[A-Z][a-z]+[A-Za-z]*", lit)}
        assert capitalised <= states, (name, capitalised - states)
        for line in (ln for ln in code.splitlines() if "file_state" in ln):
            compared = set(re.findall(r"(?:==|~=|=|\band|\bor)\s*'(\w+)'", line))
            assert compared <= files, (name, line)


def test_projection_fields_the_readers_name_exist_in_the_fold() -> None:
    """Job, ClaimedJob and CallbackJob read only fields the fold writes (or the request)."""
    prelude = lua_sources()["prelude.lua"]
    written = set(re.findall(r"\bf\.(\w+) =", prelude)) | {"updated_at", "last_event_id"}
    request = set(re.findall(r'"(\w+)": ', Path("downloader/models.py").read_text()))
    for cls in (Job, ClaimedJob, CallbackJob):
        missing = set(cls.FIELDS) - written - request
        assert not missing, (cls.__name__, missing)


async def test_every_lua_key_has_a_python_twin_spelled_the_same(
    redis_client: StrRedis,
) -> None:
    """Each KEY.* of prelude.lua is a storage.Keys member building the very same name, for
    every shard (run in a real Redis, with the KEYS[1] storage passes: the shard's events)."""
    prelude = (SCRIPTS / "prelude.lua").read_text()
    functions = re.findall(r"^function KEY\.(\w+)\(([^)]*)\)", prelude, re.M)
    constants = re.findall(r"^KEY\.(\w+) = ", prelude, re.M)
    assert functions and constants
    keys = Keys("dl", 16)
    by_job = {"job", "ev", "done"}  # Python finds the shard in the job id
    for shard in range(16):
        job_id = new_job_id(shard)
        calls = [
            (name, [job_id] if name in by_job else [f"Ab{i}" for i in range(len(p.split(",")))])
            for name, p in functions
        ]
        lua_calls = [f"KEY.{n}({', '.join(repr(a) for a in args)})" for n, args in calls]
        lua_calls += [f"KEY.{n}" for n in constants]
        script = prelude + "\nreturn {" + ", ".join(lua_calls) + "}"
        lua_names: list[Any] = await redis_client.eval(script, 1, keys.events(shard), "{}")
        python_names = [
            getattr(keys, n)(*args) if n in by_job else getattr(keys, n)(shard, *args)
            for n, args in calls
        ]
        python_names += [getattr(keys, n)(shard) for n in constants]
        assert lua_names == python_names


def test_every_fixed_key_a_script_may_touch_is_declared() -> None:
    """Each shard-wide KEY.* constant of prelude.lua but `events` (KEYS[1]) is among the fixed
    keys every script call declares."""
    prelude = (SCRIPTS / "prelude.lua").read_text()
    constants = dict(re.findall(r"^KEY\.(\w+) = P \.\. '([^']+)'$", prelude, re.M))
    assert "wake" in constants
    assert set(constants.values()) - {"events"} == set(Keys.FIXED)


def test_every_key_of_a_shard_hashes_to_its_slot() -> None:
    """A shard's keys share one Redis Cluster slot, and the shards' slots spread evenly over
    the slot space (each in its own 1/N of it)."""
    from redis.crc import key_slot

    keys = Keys("dl", 16)
    for shard in range(16):
        job_id = new_job_id(shard)
        names = [
            keys.events(shard),
            keys.job(job_id),
            keys.ev(job_id),
            keys.done(job_id),
            keys.aggr(shard, "a{b}c"),
            keys.ready(shard, "x"),
            keys.tenant_aggregations(shard, "shop"),
            keys.idempotency(shard, "k"),
        ]
        slots = {key_slot(n.encode()) for n in names}
        assert len(slots) == 1, names
        assert shard * 1024 <= slots.pop() < (shard + 1) * 1024
