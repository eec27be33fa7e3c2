"""The dashboard in real headless Chromium (Debian's), driven by Playwright."""
from __future__ import annotations

import openai
import pytest

from conftest import PASSWORD, expect
from protocol import WorkerThread

@pytest.fixture
def page(chromium, live):
    context = chromium.new_context(base_url=live.url)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live.url)
    yield context.new_page()
    context.close()


def test_sign_in_create_key_use_it_see_it_counted_and_revoke_it(page, live, account):
    page.goto("/login")
    page.fill("input[name=email]", account.email)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/dashboard")
    assert page.locator('[data-period="Last 24 hours"] .requests').inner_text() == "0"

    page.click("text=API keys")
    page.fill("input[name=name]", "from the browser")
    page.click("text=Create key")
    secret = page.locator("#new-key").inner_text()
    assert secret.startswith("pgk_")
    page.click("button[data-copy=new-key]")
    expect(page.locator("button[data-copy=new-key]")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == secret

    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=secret, max_retries=0)
    with WorkerThread(live.url, account.token):
        reply = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hello chart"}])
    assert reply.choices[0].message.content == "hello chart"

    page.click("text=Overview")
    assert page.locator('[data-period="Last 24 hours"] .requests').inner_text() == "1"
    assert page.locator("rect.band[data-model='echo'][data-value='1']").count() == 1  # today's bar in the chart
    expect(page.locator("[data-chart=requests] .legend")).to_have_text("echo")

    page.click("text=API keys")
    row = page.locator("tr", has_text="from the browser")
    row.locator("button", has_text="Revoke").click()
    expect(page.locator(".flash")).to_contain_text("The key is revoked")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_page_runs_under_its_content_security_policy(page, live):
    violations = []
    page.on("console", lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None)
    page.goto("/login")
    assert page.locator("h1").inner_text() == "Sign in"
    assert violations == []



def test_admin_edits_a_tier_and_cancels_a_job(page, app, live):
    from sqlalchemy import select, update

    from conftest import make_account
    from webapp import jobs
    from webapp.db import db
    from webapp.models import Job, Tier, User

    root = make_account(app, "root@example.com")
    with app.app_context():
        with db.begin() as s:
            s.execute(update(User).where(User.id == root.user_id).values(is_admin=True))
        job, _ = jobs.submit_job(root.user_id, None, "echo", {"model": "echo", "messages": []}, False)
    page.goto("/login")
    page.fill("input[name=email]", root.email)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.click("text=Admin")
    expect(page.locator('tr[data-model="echo"] .queued')).to_have_text("1")
    page.locator(f'tr[data-job-id="{job.id}"] button', has_text="Cancel").click()
    expect(page.locator(".flash")).to_contain_text(f"Job {job.id} is cancelled")

    page.click("text=Users and tiers")
    premium = page.locator('form[data-tier="premium"]')
    premium.locator("input[name=requests_per_minute]").fill("42")
    premium.locator("button[type=submit]").click()
    expect(page.locator(".flash")).to_contain_text("The tier is updated")
    with app.app_context(), db.read() as s:
        assert s.scalar(select(Tier.requests_per_minute).where(Tier.name == "premium")) == 42
        assert s.get(Job, job.id).state == "cancelled"


def test_a_running_request_grows_live_on_its_page_and_its_owner_cancels_it(page, app, live, account):
    from sqlalchemy import select

    from protocol import ProtoWorker
    from support import wait_for
    from webapp.db import db
    from webapp.models import Usage

    worker = ProtoWorker(live.url, account.token)
    worker.claim(wait=0)  # advertises echo
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=account.key, max_retries=0)
    queued = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "go on"}],
                                            extra_body={"background": True})
    job = wait_for(lambda: worker.claim(wait=0), 30, "the job")[0]
    worker.report(job, [{"content": "first "}])
    with app.app_context(), db.read() as s:
        usage_id = s.scalar(select(Usage.id).where(Usage.request_id == queued.id))
    page.goto("/login")
    page.fill("input[name=email]", account.email)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.goto(f"/requests/{usage_id}")
    expect(page.locator("#live-answer")).to_have_text("first ")
    expect(page.locator("#status")).to_have_text("running")
    worker.report(job, [{"content": "second"}])
    expect(page.locator("#live-answer")).to_have_text("first second")  # without a reload
    page.locator("button", has_text="Cancel it").click()
    expect(page.locator(".flash")).to_contain_text("The request is cancelled")
    expect(page.locator("#status")).to_contain_text("cancelled")
    assert worker.report(job, [{"content": " third"}])["reason"] == "cancelled"
    assert client.chat.completions.retrieve(queued.id).status == "cancelled"
