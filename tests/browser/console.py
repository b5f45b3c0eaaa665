#!/usr/bin/env python3
"""Opens a vncd console URL in real noVNC (Debian `novnc`) in headless Chromium.

usage: console.py URL [--expect-refused]

Exit 0 when noVNC reports `noVNC_connected` and draws a non-black canvas (or, with
--expect-refused, when it does NOT connect within 8 s). Chromium gets a fresh profile
in a temp dir and is ended by the webdriver on exit. Loopback only.
"""
import sys
import tempfile

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

url = sys.argv[1]
expect_refused = "--expect-refused" in sys.argv[2:]
url += ("&" if "?" in url else "?") + "autoconnect=true"

with tempfile.TemporaryDirectory() as profile:
    opts = webdriver.ChromeOptions()
    for a in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--ignore-certificate-errors", f"--user-data-dir={profile}"]:
        opts.add_argument(a)
    opts.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService("/usr/bin/chromedriver"))
    try:
        driver.get(url)
        connected = lambda d: "noVNC_connected" in d.find_element(By.TAG_NAME, "html").get_attribute("class")
        if expect_refused:
            try:
                WebDriverWait(driver, 8).until(connected)
            except TimeoutException:
                print("refused, as expected")
                sys.exit(0)
            print("connected although it should have been refused", file=sys.stderr)
            sys.exit(1)
        WebDriverWait(driver, 20).until(connected)
        lit = WebDriverWait(driver, 20).until(lambda d: d.execute_script("""
            const c = document.querySelector('#noVNC_container canvas');
            if (!c || !c.width) return 0;
            const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 0; i < px.length; i += 4) if (px[i] | px[i+1] | px[i+2]) n++;
            return n;"""))
        print(f"connected; {lit} non-black pixels")
    finally:
        driver.quit()
