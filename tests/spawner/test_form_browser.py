"""The spawn form in headless Chromium (Debian's /usr/bin/chromium): a full profile is
disabled, another one can be picked and submitted, and the user lands on the progress page."""

from __future__ import annotations

import pytest
from gpu_hub import T4_NODE, delete_pods, fill_node, start_gpu_hub, user_pods, wait

pytestmark = [pytest.mark.kube, pytest.mark.hub, pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def test_pick_profile_in_browser_and_land_on_progress_page(kube_cluster, kube_namespace, jupyterhub_factory):
    from playwright.sync_api import sync_playwright

    fillers = fill_node(kube_cluster, kube_namespace, T4_NODE, "nvidia.com/gpu")
    # the form POST waits up to slow_spawn_timeout before showing the progress page
    hub = start_gpu_hub(jupyterhub_factory, kube_cluster, kube_namespace,
                        **{"JupyterHub.tornado_settings": {"slow_spawn_timeout": 1}})
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            try:
                page = browser.new_page()
                page.goto(hub.url + "hub/login")
                page.fill("input[name=username]", "alice")
                page.fill("input[name=password]", "any")
                page.click("[type=submit]")
                page.wait_for_load_state()
                page.goto(hub.url + "hub/spawn")
                page.wait_for_selector("#hubml-profiles")

                assert page.is_disabled("#profile-item-t4-shared")
                assert "0 free of 4" in page.inner_text("label[data-profile=t4-shared]")
                assert page.is_enabled("#profile-item-mig-small")
                assert page.is_checked("#profile-item-cpu")  # the default
                # choosing an image selects its profile (a100 is alice's: she is in ml-team)
                page.select_option("#profile-option-a100--image", "jax")
                assert page.is_checked("#profile-item-a100")

                page.click("label[data-profile=mig-small]")
                assert page.is_checked("#profile-item-mig-small")
                seen: list[str] = []
                page.on("response", lambda r: seen.append(r.url))
                page.click("#spawn_form [type=submit]")
                # the progress page; the hub may move on to /user/alice/ once the server answers
                for _ in range(900):
                    if any("/hub/spawn-pending/alice" in u for u in seen):
                        break
                    page.wait_for_timeout(100)  # lets playwright deliver the response events
                assert any("/hub/spawn-pending/alice" in u for u in seen), seen
            finally:
                browser.close()
        pod = wait(lambda: user_pods(kube_cluster, kube_namespace, "alice"), "alice's pod")[0]
        assert pod["metadata"]["labels"]["hubml.io/profile"] == "mig-small"
    finally:
        hub.stop_server("alice")
        delete_pods(kube_cluster, kube_namespace, fillers)
