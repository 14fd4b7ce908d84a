"""What a job's driver started on the Ray cluster, found by ownership, and how the scheduler frees it.

A `JobDriver` actor runs Ray Train, whose controller actor reserves a placement group for the training
workers and starts a detached `PlacementGroupCleaner` to remove that group should the controller die. When
the driver is killed (a cancel) or dies, Ray kills the actors it owns, but (ray 2.60) not the rest: the
group outlives its creator because the creator's Ray job (the one that started the scheduler) had ended
before the group was made, and the cleaner never removes it because it asks Ray's state API, which needs
the dashboard llmplan's heads run without. So the scheduler frees them itself: every actor the driver's
process owns, and theirs in turn, and every placement group any of them created.

Ray's public API looks actors up by name only and placement groups have no owner in it, so the GCS tables
are read here as `ray._private.state` reads them.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

KILL_TIMEOUT_S = 10


@dataclass(frozen=True)
class ActorProcess:
    actor_id: str
    class_name: str
    node_id: str
    pid: int


@dataclass(frozen=True)
class Leftovers:
    """What a driver started that is still alive (its descendants) or still reserved (their placement groups)."""

    actors: tuple[ActorProcess, ...] = ()
    placement_groups: tuple[str, ...] = ()
    starting: tuple[str, ...] = ()  # class names of descendants not yet started: killed once they have a process

    def __bool__(self) -> bool:
        return bool(self.actors or self.placement_groups or self.starting)

    def describe(self) -> str:
        names = sorted({actor.class_name for actor in self.actors})
        waiting = f", {len(self.starting)} still starting {sorted(set(self.starting))}" if self.starting else ""
        return f"{len(self.placement_groups)} placement group(s), {len(self.actors)} actor(s) {names}{waiting}"


def leftovers_of(driver_actor_id: str) -> Leftovers:
    """The live actors started (directly or through its own) by the driver actor, and their placement groups."""
    from ray.core.generated.gcs_pb2 import ActorTableData, PlacementGroupTableData

    accessor = _gcs()
    driver = accessor.get_actor_info(_actor_id(driver_actor_id))
    if driver is None:
        return Leftovers()
    driver = ActorTableData.FromString(driver)
    same_job = [ActorTableData.FromString(raw) for raw in accessor.get_actor_table(_job_id(driver.job_id), None)]
    started = _owned_by(driver, same_job)
    creators = {driver.actor_id, *(actor.actor_id for actor in started)}
    groups = (PlacementGroupTableData.FromString(raw) for raw in accessor.get_placement_group_table())
    removed = PlacementGroupTableData.REMOVED
    running = [actor for actor in started if actor.state == ActorTableData.ALIVE and actor.pid]
    return Leftovers(
        actors=tuple(ActorProcess(actor.actor_id.hex(), actor.class_name, actor.address.node_id.hex(), actor.pid)
                     for actor in running),
        placement_groups=tuple(group.placement_group_id.hex() for group in groups
                               if group.creator_actor_id in creators and group.state != removed),
        # A detached actor whose creation was under way when its owner died (Ray Train's PlacementGroupCleaner on
        # a busy node) starts afterwards and lives on: keep sweeping until it has a process to kill.
        starting=tuple(actor.class_name for actor in started
                       if actor.state != ActorTableData.DEAD and actor not in running),
    )


def release(driver_actor_id: str) -> Leftovers:
    """Remove the driver's placement groups and kill its live descendants; returns what it found (empty:
    nothing was left). Ray reports a killed actor's death on its own, so call again to see it done."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    found = leftovers_of(driver_actor_id)
    for group in found.placement_groups:
        remove_placement_group(PlacementGroup(_placement_group_id(group)))
    _kill(found.actors)
    return found


def _owned_by(root: Any, actors: list[Any]) -> list[Any]:
    """Every actor owned by `root`'s worker process, and by theirs, and so on; never a named one: others find
    those by name and share them (Ray Train's `AutoscalingCoordinator` serves every run on the cluster)."""
    by_owner: dict[bytes, list[Any]] = defaultdict(list)
    for actor in actors:
        if not actor.name:
            by_owner[actor.owner_address.worker_id].append(actor)
    found, owners = [], [root.address.worker_id]
    while owners:
        owner = owners.pop()
        if not owner:
            continue  # an actor that never started owns nothing
        for actor in by_owner.pop(owner, []):
            found.append(actor)
            owners.append(actor.address.worker_id)
    return found


def _kill(actors: tuple[ActorProcess, ...]) -> None:
    """SIGKILL each actor's process on its node (Ray then records it dead; detached ones are not restarted).
    ray.kill needs a handle, which Ray gives for named actors only."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    by_node: dict[str, list[int]] = defaultdict(list)
    for actor in actors:
        by_node[actor.node_id].append(actor.pid)
    kill = ray.remote(num_cpus=0, max_retries=0)(_kill_processes)
    calls = [kill.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(pids)
             for node, pids in by_node.items()]
    with contextlib.suppress(ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
        ray.get(calls, timeout=KILL_TIMEOUT_S)  # a node that died took its processes with it


def _kill_processes(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _gcs() -> Any:
    from ray._private.state import state

    return state._connect_and_get_accessor()


def _actor_id(hex_id: str) -> Any:
    import ray

    return ray.ActorID(bytes.fromhex(hex_id))


def _job_id(binary: bytes) -> Any:
    import ray

    return ray.JobID(binary)


def _placement_group_id(hex_id: str) -> Any:
    import ray

    return ray.PlacementGroupID(bytes.fromhex(hex_id))
