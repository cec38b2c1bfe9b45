"""The process lifecycle tables: what each state allows, and the errors that refuse the rest."""

import pytest

from shim.task.errors import FailedPrecondition, NotFound
from shim.task.state import EXEC, INIT, Lifecycle, Op, State, next_state


def test_the_life_of_an_init():
    life = Lifecycle(INIT, "container c1")
    assert life.state is State.CREATED
    assert life.apply(Op.START) is State.RUNNING
    assert life.apply(Op.PAUSE) is State.PAUSED
    assert life.apply(Op.RESUME) is State.RUNNING
    assert life.apply(Op.EXIT) is State.STOPPED
    assert life.apply(Op.DELETE) is State.DELETED


def test_the_life_of_an_exec():
    life = Lifecycle(EXEC, "exec e1 in container c1")
    assert [life.apply(op) for op in (Op.START, Op.EXIT, Op.DELETE)] == \
        [State.RUNNING, State.STOPPED, State.DELETED]


@pytest.mark.parametrize("state,op", [
    (State.RUNNING, Op.START), (State.RUNNING, Op.DELETE), (State.STOPPED, Op.START),
    (State.STOPPED, Op.PAUSE), (State.CREATED, Op.PAUSE), (State.PAUSED, Op.EXEC),
    (State.STOPPED, Op.EXEC), (State.RUNNING, Op.RESUME), (State.STOPPED, Op.UPDATE),
    (State.PAUSED, Op.DELETE), (State.CREATED, Op.CHECKPOINT),
])
def test_illegal_operations_name_the_process_and_its_state(state, op):
    with pytest.raises(FailedPrecondition) as err:
        next_state(INIT, state, op, "container c1")
    assert err.value.message == f"cannot {op.value} container c1: it is {state.value}"


@pytest.mark.parametrize("op", [Op.PAUSE, Op.RESUME, Op.UPDATE, Op.CHECKPOINT, Op.EXEC])
def test_an_exec_does_only_what_an_exec_can(op):
    with pytest.raises(FailedPrecondition):
        next_state(EXEC, State.RUNNING, op, "exec e1 in container c1")


def test_killing_an_exec_depends_on_its_state():
    with pytest.raises(FailedPrecondition, match="exec e1 in container c1: process not created"):
        next_state(EXEC, State.CREATED, Op.KILL, "exec e1 in container c1")
    with pytest.raises(NotFound, match="exec e1 in container c1: process already finished"):
        next_state(EXEC, State.STOPPED, Op.KILL, "exec e1 in container c1")
    # an init's stopped state accepts the kill: runc's answer decides
    assert next_state(INIT, State.STOPPED, Op.KILL, "container c1") is State.STOPPED


@pytest.mark.parametrize("table", [INIT, EXEC])
def test_a_deleted_process_is_not_found(table):
    for op in Op:
        with pytest.raises(NotFound):
            next_state(table, State.DELETED, op, "container c1")


def test_check_does_not_change_state():
    life = Lifecycle(INIT, "container c1")
    life.check(Op.START)
    assert life.state is State.CREATED


def test_a_refused_operation_leaves_the_state():
    life = Lifecycle(INIT, "container c1")
    life.apply(Op.START)
    with pytest.raises(FailedPrecondition):
        life.apply(Op.RESUME)
    assert life.state is State.RUNNING


def test_every_state_but_deleted_can_be_left():
    """No state is a trap: from each one, some operation leads elsewhere (DELETED at the end)."""
    for table in (INIT, EXEC):
        reached = {to for to in table.values() if isinstance(to, State)} | {State.CREATED}
        for state in reached - {State.DELETED}:
            assert any(s is state and isinstance(to, State) and to is not state
                       for (s, _), to in table.items()), (table is INIT, state)
