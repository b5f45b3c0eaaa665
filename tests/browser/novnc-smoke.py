#!/usr/bin/env python3
"""Real-browser check: noVNC 1.3 (Debian `novnc`) in headless Chromium, served by `vncd proxy --web`,
connects through the proxy (with a token) to QEMU's VNC server and draws a non-black canvas.

usage: tests/browser/novnc-smoke.py PATH/TO/vncd
needs: Debian novnc chromium chromium-driver qemu-system-x86, pip selenium.
Everything listens on 127.0.0.1; every process started here is ended by pid on exit.
"""
import os, socket, subprocess, sys, tempfile, time

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

VNCD = sys.argv[1]
TOKEN = "browser-smoke-Token-123"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, banner=False):
    for _ in range(200):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=1)
            if not banner or s.recv(12) == b"RFB 003.008\n":
                s.close()
                return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


procs = []
tmp = tempfile.TemporaryDirectory()
try:
    vnc = free_port()
    procs.append(subprocess.Popen(
        ["qemu-system-x86_64", "-display", "none", "-nodefaults", "-machine", "none",
         "-vnc", f"127.0.0.1:{vnc - 5900}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    assert wait_port(vnc, banner=True), "QEMU VNC did not start"
    token_file = os.path.join(tmp.name, "token")
    with open(token_file, "w") as f:
        f.write(TOKEN + "\n")
    port = free_port()
    log = open(os.path.join(tmp.name, "proxy.log"), "w+")
    procs.append(subprocess.Popen(
        [VNCD, "proxy", "--listen", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{vnc}",
         "--web", "/usr/share/novnc", "--token-file", token_file],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log))
    assert wait_port(port), "proxy did not listen"

    opts = webdriver.ChromeOptions()
    for a in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={os.path.join(tmp.name, 'chrome')}"]:
        opts.add_argument(a)
    opts.binary_location = "/usr/bin/chromium"
    service = webdriver.ChromeService(executable_path="/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=opts, service=service)
    try:
        url = (f"http://127.0.0.1:{port}/vnc.html?autoconnect=true&host=127.0.0.1&port={port}"
               f"&path=websockify%3Ftoken%3D{TOKEN}")
        driver.get(url)
        WebDriverWait(driver, 20).until(
            lambda d: "noVNC_connected" in d.find_element(By.TAG_NAME, "html").get_attribute("class"))
        lit = WebDriverWait(driver, 20).until(lambda d: d.execute_script("""
            const c = document.querySelector('#noVNC_container canvas');
            if (!c || !c.width) return 0;
            const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 0; i < px.length; i += 4) if (px[i] | px[i+1] | px[i+2]) n++;
            return n;"""))
        size = driver.execute_script(
            "const c=document.querySelector('#noVNC_container canvas');return [c.width,c.height]")
        print(f"noVNC connected through vncd proxy: canvas {size[0]}x{size[1]}, {lit} non-black pixels")

        # Wrong token: noVNC must not connect.
        driver.get(url.replace(TOKEN, "wrong-token"))
        time.sleep(3)
        cls = driver.find_element(By.TAG_NAME, "html").get_attribute("class")
        assert "noVNC_connected" not in cls, "connected with a wrong token"
        print("wrong token: not connected (as expected)")
    finally:
        driver.quit()
    log.seek(0)
    text = log.read()
    assert TOKEN not in text, "token leaked into the proxy log"
    print("proxy log holds no token;", text.count("connection closed"), "connection lines")
finally:
    for p in reversed(procs):
        p.kill()
        p.wait()
    tmp.cleanup()
