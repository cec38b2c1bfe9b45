"""The process lifecycle table."""

import pytest

from shim.task.state import Lifecycle, State, next_state
from shim.ttrpc import Code, TTRPCError


def test_normal_life():
    life = Lifecycle()
    assert life.state is State.CREATED
    assert life.apply("start") is State.RUNNING
    assert life.apply("pause") is State.PAUSING
    assert life.apply("paused") is State.PAUSED
    assert life.apply("resume") is State.RUNNING
    assert life.apply("exit") is State.STOPPED
    assert life.apply("delete") is State.DELETED


@pytest.mark.parametrize("state,op", [
    (State.RUNNING, "start"), (State.RUNNING, "delete"), (State.STOPPED, "start"),
    (State.STOPPED, "pause"), (State.CREATED, "pause"), (State.PAUSED, "exec"),
    (State.STOPPED, "exec"), (State.RUNNING, "resume"), (State.STOPPED, "update"),
])
def test_illegal_operations_name_the_state(state, op):
    with pytest.raises(TTRPCError) as err:
        next_state(state, op)
    assert err.value.code == Code.FAILED_PRECONDITION
    assert f"cannot {op} a {state.value} process" == err.value.message


def test_deleted_process_is_not_found():
    with pytest.raises(TTRPCError) as err:
        next_state(State.DELETED, "kill")
    assert err.value.code == Code.NOT_FOUND


def test_check_does_not_change_state():
    life = Lifecycle()
    life.check("start")
    assert life.state is State.CREATED


def test_a_failed_pause_or_resume_goes_back():
    life = Lifecycle()
    life.apply("start")
    life.apply("pause")
    assert life.apply("pause_failed") is State.RUNNING
    life.apply("pause")
    life.apply("paused")
    life.apply("resume")
    assert life.apply("resume_failed") is State.PAUSED
