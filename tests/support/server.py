# A tiny HTTP server the dev-mode tests run as a Function's replica.
#   GET /?delay=S     answers after S seconds; the body names the process and replica.
#   IGNORE_TERM=1     ignores SIGTERM (to test the SIGKILL after the grace period).
import os
import signal
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        query = parse_qs(urlparse(self.path).query)
        delay = float(query.get("delay", ["0"])[0])
        print("started %s" % self.path, flush=True)
        if delay:
            time.sleep(delay)
        body = ("pid=%d host=%s\n" % (os.getpid(), os.environ.get("HOSTNAME", ""))).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
ThreadingHTTPServer.daemon_threads = True
print("listening on %s" % os.environ["PORT"], flush=True)
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
