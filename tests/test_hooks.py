"""The training loop's hooks: the call order a hook sees, what it can read, how it stops a run;
the loop on its own (a toy subclass) and in a real distillation on the tiny backbone."""

import contextlib
import json
import math

import pytest
from helpers import train_config, write_scene_images

from spar.distill import HookBase, RunLog, TrainLoop, run_distillation
from spar.distill.loop import accumulation_groups
from spar.distributed import register_run_id_resolver

register_run_id_resolver()


def small_run(tmp_path, name, *overrides, hooks=()):
    """``helpers.small_run`` with ``hooks`` added to the loop: 5 images (1 held out), 2 views
    each, one view per optimizer step, so 8 steps an epoch."""
    images = tmp_path / "images"
    if not images.is_dir():
        write_scene_images(images, count=5)
    cfg = train_config(
        tmp_path,
        f"train_images.root={images}",
        "train_images.augment.bounds=[160,128]",
        "train_images.augment.min_crop=64",
        "train_images.augment.min_short_side=64",
        "train_images.draws_per_image=2",
        "heldout.num_images=1",
        "heldout.sizes=[[160,128]]",
        "teacher.window=96",
        "teacher.stride=24",
        *overrides,
    )
    return run_distillation(cfg, tmp_path / name, hooks=hooks), tmp_path / name


class Recorder(HookBase):
    """Records every event with the trainer's step (and the loss after a step)."""

    def __init__(self, stop_at_step=None):
        self.calls, self.stop_at_step = [], stop_at_step

    def before_train(self):
        self.calls.append(("before_train", self.trainer.state.step))

    def before_epoch(self):
        self.calls.append(("before_epoch", self.trainer.state.epoch))

    def before_step(self):
        self.calls.append(("before_step", self.trainer.state.step))

    def after_step(self):
        self.calls.append(("after_step", self.trainer.state.step, self.trainer.step_loss))
        if self.trainer.state.step == self.stop_at_step:
            self.trainer.request_stop()

    def after_epoch(self):
        self.calls.append(("after_epoch", self.trainer.state.epoch))

    def after_train(self):
        self.calls.append(("after_train", self.trainer.state.step))


def events(calls):
    return [call[0] for call in calls]


def test_a_hook_sees_every_event_in_order_with_step_and_loss(tmp_path):
    hook = Recorder()
    summary, run_dir = small_run(tmp_path, "run", "trainer.epochs=1", hooks=[hook])
    # 5 images, 1 held out, 2 draws each: 8 views, one optimizer step each
    assert events(hook.calls) == [
        "before_train",
        "before_epoch",
        *["before_step", "after_step"] * 8,
        "after_epoch",
        "after_train",
    ]
    steps = [call[1] for call in hook.calls if call[0] == "after_step"]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [call[1] for call in hook.calls if call[0] == "before_step"] == list(range(8))
    assert hook.calls[-2] == ("after_epoch", 1) and hook.calls[-1] == ("after_train", 8)
    losses = [call[2] for call in hook.calls if call[0] == "after_step"]
    assert all(math.isfinite(loss) and loss > 0 for loss in losses)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r["loss"] for r in records if r["event"] == "train"]  # log_every=1, one rank
    assert logged == pytest.approx(losses, rel=1e-12)
    assert summary["steps"] == 8 and summary["stopped_early"] is False


def test_a_hook_can_stop_the_run_and_the_run_resumes(tmp_path):
    hook = Recorder(stop_at_step=3)
    summary, run_dir = small_run(tmp_path, "run", "trainer.epochs=1", hooks=[hook])
    assert summary["stopped_early"] is True and summary["steps"] == 3
    assert events(hook.calls)[-3:] == ["before_step", "after_step", "after_train"]
    assert "after_epoch" not in events(hook.calls)
    # the stopped run was checkpointed at step 3 and continues from there
    resumed = Recorder()
    summary, _ = small_run(
        tmp_path, "run", "trainer.epochs=1", f"resume={run_dir}", hooks=[resumed]
    )
    assert resumed.calls[0] == ("before_train", 3)
    assert [call[1] for call in resumed.calls if call[0] == "after_step"] == [4, 5, 6, 7, 8]
    assert summary["steps"] == 8 and summary["stopped_early"] is False


def test_user_hooks_run_after_the_log_hook_of_the_same_step(tmp_path):
    class LinesSeen(HookBase):
        def __init__(self):
            self.lines = []

        def after_step(self):
            metrics = self.trainer.out_dir / "metrics.jsonl"
            self.lines.append(len(metrics.read_text().splitlines()))

    hook = LinesSeen()
    small_run(tmp_path, "run", "trainer.epochs=1", "trainer.stop_after_steps=2", hooks=[hook])
    # a "heldout" record before training, then one "train" record per step (log_every=1),
    # written before the user's hook runs
    assert hook.lines == [2, 3]
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["event"] for r in records] == ["heldout", "train", "train"]


def test_register_hooks_refuses_what_is_not_a_hook():
    class Empty(ToyLoop):
        pass

    with pytest.raises(TypeError, match="must subclass spar.distill.HookBase"):
        Empty(epochs=1, steps=1).register_hooks([object()])


def test_the_tensorboard_keyword_of_runlog_names_the_hook(tmp_path):
    with pytest.raises(TypeError, match=r"tensorboard= is now the hook \S+TensorBoardHook"):
        RunLog(tmp_path, tensorboard=True)


class ToyLoop(TrainLoop):
    """Epochs of ``steps`` optimizer steps of one micro-batch each, recording what it runs."""

    def __init__(self, epochs, steps):
        super().__init__()
        self.epochs, self.steps, self.epoch, self.ran = epochs, steps, 0, []

    def epochs_left(self):
        return self.epoch < self.epochs

    @contextlib.contextmanager
    def epoch_steps(self):
        yield ([(self.epoch, step)] for step in range(self.steps))

    def run_step(self, micro_batches):
        self.ran += list(micro_batches)

    def finish_epoch(self):
        self.epoch += 1


class EventLog(HookBase):
    def __init__(self, log, name, stop_on=None):
        self.log, self.name, self.stop_on = log, name, stop_on

    def __getattribute__(self, event):
        if event.startswith(("before_", "after_")):

            def call():
                self.log.append((self.name, event))
                if event == self.stop_on:
                    self.trainer.request_stop()

            return call
        return super().__getattribute__(event)


def test_the_loop_calls_hooks_in_registration_order_around_epochs_and_steps():
    log = []
    loop = ToyLoop(epochs=2, steps=1)
    loop.register_hooks([EventLog(log, "a"), None, EventLog(log, "b")])
    assert loop.train() is False
    assert loop.ran == [(0, 0), (1, 0)]
    expected = []
    for event in (
        ["before_train"]
        + ["before_epoch", "before_step", "after_step", "after_epoch"] * 2
        + ["after_train"]
    ):
        expected += [("a", event), ("b", event)]
    assert log == expected


@pytest.mark.parametrize(
    ("stop_on", "ran", "last_events"),
    [
        ("before_train", [], ["before_train", "after_train"]),
        ("before_epoch", [], ["before_epoch", "after_train"]),
        ("after_step", [(0, 0)], ["after_step", "after_train"]),
        ("after_epoch", [(0, 0), (0, 1)], ["after_epoch", "after_train"]),
    ],
)
def test_a_stop_request_ends_the_loop_after_its_event(stop_on, ran, last_events):
    log = []
    loop = ToyLoop(epochs=2, steps=2)
    loop.register_hooks([EventLog(log, "h", stop_on=stop_on)])
    assert loop.train() is True
    assert loop.ran == ran
    assert [event for _, event in log[-2:]] == last_events


@pytest.mark.parametrize(
    ("start", "total", "accumulate", "groups"),
    [
        (0, 5, 2, [[0, 1], [2, 3], [4]]),
        (2, 5, 2, [[2, 3], [4]]),
        (3, 5, 2, [[3], [4]]),  # a start inside a group finishes that group
        (0, 3, 1, [[0], [1], [2]]),
        (5, 5, 2, []),
    ],
)
def test_accumulation_groups_are_the_optimizer_steps(start, total, accumulate, groups):
    batches = iter([(position, f"batch {position}") for position in range(start, total)])
    found = [list(group) for group in accumulation_groups(batches, start, total, accumulate)]
    assert [[position for position, _ in group] for group in found] == groups
    assert [batch for group in found for _, batch in group] == [
        f"batch {p}" for p in range(start, total)
    ]


def test_a_step_of_accumulated_micro_batches_shows_each_micro_batch_loss(tmp_path):
    class MicroBatches(HookBase):
        def __init__(self):
            self.seen = []

        def after_step(self):
            trainer = self.trainer
            self.seen.append((trainer.state.step, trainer.state.consumed, trainer.step_losses))
            mean = sum(loss for loss, _ in trainer.step_losses) / len(trainer.step_losses)
            assert trainer.step_loss == pytest.approx(mean, rel=1e-12)  # one view each

    hook = MicroBatches()
    small_run(tmp_path, "run", "trainer.epochs=1", "trainer.accumulate=3", hooks=[hook])
    # 8 views, 3 per optimizer step: steps of 3, 3 and 2 micro-batches
    assert [(step, consumed) for step, consumed, _ in hook.seen] == [(1, 3), (2, 6), (3, 8)]
    assert [[used for _, used in losses] for _, _, losses in hook.seen] == [
        [1, 1, 1],
        [1, 1, 1],
        [1, 1],
    ]


def test_run_log_hands_each_record_to_its_listeners_once(tmp_path):
    seen = []
    log = RunLog(tmp_path)
    log.add_listener(seen.append)
    log.add_listener(seen.append)  # added once only
    log.write({"event": "train", "step": 1, "loss": 0.5})
    log.write({"event": "heldout", "step": 1, "448x336": {"mse": 0.25}})
    assert seen == [
        {"event": "train", "step": 1, "loss": 0.5},
        {"event": "heldout", "step": 1, "448x336": {"mse": 0.25}},
    ]
    other_rank = RunLog(tmp_path / "rank1", enabled=False)
    other_rank.add_listener(seen.append)
    other_rank.write({"event": "train", "step": 2, "loss": 0.5})
    assert len(seen) == 2 and not (tmp_path / "rank1" / "metrics.jsonl").exists()
