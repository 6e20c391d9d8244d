"""Human approval of a promotion: the flow pauses, a person answers through Prefect."""

from __future__ import annotations

import threading
import time

import pytest

from tasks.gate import Approval, Decision, GateConfig, ask_approval, with_approval

PASSED = Decision(promote=True, reasons=["pass: win rate vs SFT 0.900 vs min_win_rate 0.6"])


def test_with_approval_adds_one_check():
    yes = with_approval(PASSED, Approval(approve=True, reviewer="ana", comment="looks good"))
    assert yes.promote and yes.reasons[-1] == "pass: human approval by ana: looks good"
    no = with_approval(PASSED, Approval(approve=False))
    assert not no.promote and no.reasons[-1] == "FAIL: human approval by a reviewer"
    refused = Decision(promote=False, reasons=["FAIL: KL"])
    assert not with_approval(refused, Approval(approve=True)).promote  # approval never overrides


@pytest.mark.parametrize("approve", [True, False])
def test_flow_pauses_until_a_person_answers(prefect_harness, approve):
    from prefect import flow, resume_flow_run
    from prefect.client.orchestration import get_client
    from prefect.context import get_run_context

    seen: dict = {}

    @flow
    def gated() -> Decision:
        seen["id"] = get_run_context().flow_run.id
        return ask_approval(PASSED, GateConfig(require_approval=True, approval_timeout_s=120),
                            ctx=None)

    out: dict = {}
    worker = threading.Thread(target=lambda: out.setdefault("decision", gated()))
    worker.start()
    deadline = time.monotonic() + 90
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if "id" in seen and client.read_flow_run(seen["id"]).state.is_paused():
                break
            time.sleep(0.5)
        else:
            pytest.fail("the flow run never paused for approval")
    resume_flow_run(seen["id"], run_input={"approve": approve, "reviewer": "ana"})
    worker.join(timeout=90)
    decision = out["decision"]
    assert decision.promote is approve
    assert decision.reasons[-1] == f"{'pass' if approve else 'FAIL'}: human approval by ana"
