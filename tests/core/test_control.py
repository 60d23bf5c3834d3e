"""Stop requests across a rank's runs: a request addressed to the run starting now survives that run's reset
(it may reach a restarted rank before the rank has begun), a leftover of an earlier run does not."""
from raytrainer.core import control


def test_a_request_sent_before_its_run_began_survives_the_reset():
    control.reset()
    control.request_stop("resize", "run-b")
    control.reset("run-b")
    assert control.stop_reason() == "resize"
    control.reset()


def test_a_request_of_an_earlier_run_is_forgotten():
    control.reset()
    control.request_stop("resize", "run-a")
    control.reset("run-b")
    assert control.stop_reason() is None
    control.request_stop("preempt")  # SIGTERM names no run
    control.reset("run-c")
    assert control.stop_reason() is None


def test_a_preemption_is_never_downgraded_to_a_resize():
    control.reset()
    control.request_stop("preempt", "run-a")
    control.request_stop("resize", "run-a")
    control.reset("run-a")
    assert control.stop_reason() == "preempt"
    control.reset()
