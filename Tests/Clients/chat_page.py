#!/usr/bin/env python3
"""strun serve's chat page in a real browser: headless Chromium (Debian's chromium and
chromium-driver) driven by Selenium.

    python3 Tests/Clients/chat_page.py STRUN PACKAGE SCREENSHOT_DIR

Starts `strun serve PACKAGE --port 0` itself (loopback only), then, in the browser: types a
message and sends it with Enter, and checks the streamed reply equals the API's reply (the openai
package) for the same seed and settings; presses Stop during a long reply and checks the server's
active sequences fall to zero; reloads and sees a fresh chat; checks a phone-sized and a
desktop-sized window; shows server errors (a prompt longer than the context, a full queue) as
messages; and, on a server with --api-key, that the page asks for the key, shows the server's message for a
wrong one, and works with the right one. A screenshot of each step goes to SCREENSHOT_DIR.
Exit status 0 means every check passed.
"""
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_clients  # noqa: E402  (its Server class, checks and metrics)
from serve_clients import Failure, Server, check  # noqa: E402

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

SHOTS = None


def browser(width=1280, height=800):
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", f"--window-size={width},{height}",
                 "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(flag)
    # Debian's browser and driver, named outright: Selenium never fetches either from the internet.
    binary = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(p)), None)
    driver_path = next((p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if os.path.exists(p)), None)
    if not binary or not driver_path:
        raise Failure("chromium and chromedriver are not installed (.ci/setup installs Debian's chromium and chromium-driver)")
    options.binary_location = binary
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    return driver


def shot(driver, name):
    path = os.path.join(SHOTS, name + ".png")
    driver.save_screenshot(path)
    check(os.path.getsize(path) > 1000, f"screenshot {path} is empty")


def wait(what, condition, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise Failure(f"{what} within {timeout} s")


def replies(driver):
    return driver.find_elements(By.CSS_SELECTOR, ".message.assistant")


def set_field(driver, element_id, value):
    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(str(value))
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", element)


def type_and_enter(driver, text):
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def main():
    global SHOTS
    strun, package, SHOTS = sys.argv[1], sys.argv[2], sys.argv[3]
    serve_clients.STRUN, serve_clients.PACKAGE = strun, package
    os.makedirs(SHOTS, exist_ok=True)
    import openai

    with Server("--parallel", "2") as server:
        driver = browser()
        try:
            driver.get(server.url + "/")
            wait("the page did not name the model", lambda: "strun chat:" in driver.find_element(By.ID, "title").text)
            shot(driver, "1-empty")

            # A message sent with Enter (Shift+Enter is a new line): the streamed reply equals the API's.
            driver.find_element(By.ID, "settings-button").click()
            set_field(driver, "temperature", "0.8")
            set_field(driver, "top-p", "0.9")
            set_field(driver, "max-tokens", "40")
            set_field(driver, "seed", "11")
            box = driver.find_element(By.ID, "input")
            box.send_keys("Who begat")
            box.send_keys(Keys.SHIFT, Keys.ENTER)
            check(box.get_attribute("value") == "Who begat\n", f"Shift+Enter did not make a new line: {box.get_attribute('value')!r}")
            check(not replies(driver), "Shift+Enter sent the message")
            box.send_keys("Enos?")
            box.send_keys(Keys.ENTER)
            reply = wait("no reply", lambda: (replies(driver) or [None])[0])
            wait("the reply did not finish", lambda: reply.get_attribute("data-state") == "done")
            streamed = reply.find_element(By.CSS_SELECTOR, ".text").text
            stats = reply.find_element(By.CSS_SELECTOR, ".stats").text
            check("tokens" in stats and "first token" in stats and "tokens/s" in stats, f"stats line {stats!r}")
            shot(driver, "2-reply")
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)
            api = client.chat.completions.create(
                model=client.models.list().data[0].id, temperature=0.8, top_p=0.9, max_tokens=40, seed=11,
                messages=[{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Who begat\nEnos?"}])
            # The page shows the text as text (white space as it is); Selenium's .text trims the ends.
            check(streamed == api.choices[0].message.content.strip(), f"page {streamed!r} != API {api.choices[0].message.content!r}")
            check(str(api.usage.completion_tokens) + " tokens" in stats, f"stats {stats!r} vs usage {api.usage}")

            # Stop during a long reply: the server's active sequences fall to zero.
            set_field(driver, "max-tokens", "3000")
            set_field(driver, "extra", json.dumps({"ignore_eos": True}))
            type_and_enter(driver, "Tell me everything.")
            long_reply = wait("no second reply", lambda: len(replies(driver)) == 2 and replies(driver)[1])
            wait("the long reply did not stream", lambda: len(long_reply.find_element(By.CSS_SELECTOR, ".text").text) > 20)
            check(server.metrics()["strun_active_sequences"] == 1, "the streaming reply holds no sequence")
            shot(driver, "3-streaming")
            driver.find_element(By.ID, "stop").click()
            wait("the reply did not stop", lambda: long_reply.get_attribute("data-state") == "stopped", timeout=10)
            serve_clients.wait_for(server, "strun_active_sequences", 0, "Stop did not free the sequence")
            check(server.metrics()["strun_generated_tokens_total"] < 3000, "the stopped reply ran to its end")
            check(not driver.find_element(By.ID, "send").get_attribute("disabled"), "Send stays disabled after Stop")
            shot(driver, "4-stopped")

            # A server error (the prompt does not fit the context) is shown as a message.
            set_field(driver, "extra", "")
            set_field(driver, "max-tokens", "8")
            driver.execute_script("document.getElementById('input').value = arguments[0]", "And it came to pass " * 2500)
            driver.find_element(By.ID, "input").send_keys(Keys.ENTER)
            error = wait("no error message", lambda: driver.find_elements(By.CSS_SELECTOR, ".message.error"))
            check("context" in error[0].text, f"error message {error[0].text!r}")
            check(driver.find_element(By.ID, "input").get_attribute("value").startswith("And it came"), "the refused message was lost")
            check(len(driver.find_elements(By.CSS_SELECTOR, ".message.user")) == 2, "the refused message stays in the conversation")
            driver.execute_script("document.getElementById('input').value = ''")
            shot(driver, "5-error")

            # Text is text: markup in a message is shown, not parsed (replies go through the same code).
            type_and_enter(driver, "<b>bold</b> <img src=x onerror=alert(1)>")
            wait("no reply", lambda: replies(driver) and replies(driver)[-1].get_attribute("data-state") == "done")
            shown = driver.find_elements(By.CSS_SELECTOR, ".message.user .text")[-1].text
            check(shown == "<b>bold</b> <img src=x onerror=alert(1)>", f"markup shown as {shown!r}")
            check(not driver.find_elements(By.CSS_SELECTOR, ".message .text *"), "a message holds HTML elements")

            # Reload: a fresh chat.
            driver.refresh()
            wait("the reloaded page did not name the model", lambda: "strun chat:" in driver.find_element(By.ID, "title").text)
            check(not driver.find_elements(By.CSS_SELECTOR, ".message"), "the reloaded page still shows messages")
            shot(driver, "6-reloaded")

            # Phone-sized and desktop-sized windows: nothing wider than the window, the controls visible.
            for name, (width, height) in {"phone": (390, 844), "desktop": (1366, 900)}.items():
                driver.set_window_size(width, height)
                type_and_enter(driver, "Hi")
                wait("no reply", lambda: replies(driver) and replies(driver)[-1].get_attribute("data-state") == "done")
                overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
                check(overflow <= 0, f"{name}: the page is {overflow} px wider than the window")
                for element_id in ("input", "send", "stop", "new-chat", "settings-button"):
                    check(driver.find_element(By.ID, element_id).is_displayed(), f"{name}: #{element_id} is not visible")
                shot(driver, f"7-{name}")
            driver.find_element(By.ID, "new-chat").click()
            check(not driver.find_elements(By.CSS_SELECTOR, ".message"), "New chat left messages")
        finally:
            driver.quit()

    # A full queue: with the one sequence busy and no room to wait, the page shows the server's 503.
    with Server("--parallel", "1", "--queue", "0") as server:
        body = json.dumps({"prompt": "And it came to pass", "max_tokens": 3000, "ignore_eos": True, "stream": True})
        busy = subprocess.Popen(["curl", "-sS", "-N", "--max-time", "120", "-d", body, server.url + "/v1/completions"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        driver = browser()
        try:
            serve_clients.wait_for(server, "strun_active_sequences", 1, "the busy request did not start")
            driver.get(server.url + "/")
            wait("the page did not name the model", lambda: "strun chat:" in driver.find_element(By.ID, "title").text)
            type_and_enter(driver, "Hello?")
            error = wait("no message for a full queue", lambda: driver.find_elements(By.CSS_SELECTOR, ".message.error"))
            check("busy" in error[0].text, f"queue-full message {error[0].text!r}")
            shot(driver, "8-queue-full")
        finally:
            driver.quit()
            busy.kill()
            busy.wait()

    # With --api-key: the page asks for the key, shows the server's message for a wrong one.
    with Server("--api-key", "sk-page-test") as server:
        driver = browser()
        try:
            driver.get(server.url + "/")
            wait("the page did not ask for the key", lambda: driver.find_element(By.ID, "key").is_displayed())
            shot(driver, "9-key-asked")
            key = driver.find_element(By.ID, "key")
            key.send_keys("sk-wrong")
            key.send_keys(Keys.ENTER)
            wait("no message for a wrong key", lambda: len(driver.find_elements(By.CSS_SELECTOR, ".message.error")) >= 2)
            message = driver.find_elements(By.CSS_SELECTOR, ".message.error")[-1].text
            check("API key" in message, f"wrong key message {message!r}")
            shot(driver, "10-key-wrong")
            key = driver.find_element(By.ID, "key")
            key.clear()
            key.send_keys("sk-page-test")
            key.send_keys(Keys.ENTER)
            wait("the key form stayed open", lambda: not driver.find_element(By.ID, "key").is_displayed())
            type_and_enter(driver, "Hi")
            wait("no reply with the key", lambda: replies(driver) and replies(driver)[-1].get_attribute("data-state") == "done")
            shot(driver, "11-key-right")
        finally:
            driver.quit()
    print(f"chat page: streamed reply equals the API's, Stop frees the sequence, reload is fresh, phone and desktop sizes, "
          f"errors and API key shown; screenshots in {SHOTS}: OK")


if __name__ == "__main__":
    try:
        main()
    except Failure as failure:
        print(f"chat page: FAILED: {failure}")
        sys.exit(1)
