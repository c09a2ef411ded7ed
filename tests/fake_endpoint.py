"""A stand-in for a SageMaker endpoint: a real HTTP server speaking the SageMaker Runtime REST API."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# How SageMaker Runtime answers its errors: the HTTP status of each code in botocore's service model
# (ThrottlingException is the generic AWS one), the code in `x-amzn-ErrorType`, the text in `message`.
ENDPOINT_ERROR_STATUS = {
    "ValidationError": 400,
    "ThrottlingException": 400,
    "ModelError": 424,
    "ModelNotReadyException": 429,
    "InternalFailure": 500,
    "ServiceUnavailable": 503,
    "InternalDependencyException": 530,
}


class FakeEndpoint(ThreadingHTTPServer):
    """Stands in for SageMaker Runtime at `POST /endpoints/{name}/invocations`.

    Fails once per code in `failures`, as the real service does (status, `x-amzn-ErrorType`, JSON
    `message`), then answers `answer_body`; records every request it gets in `requests`.
    """

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeEndpointRequest)
        self.answer_body = b"[0.25, 0.75]"
        self.failures: list[str] = []
        self.requests: list[dict] = []
        self.url = f"http://127.0.0.1:{self.server_port}"

    def __enter__(self) -> "FakeEndpoint":
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join()


class FakeEndpointRequest(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append({"path": self.path, "content_type": self.headers["Content-Type"], "body": body})
        if self.server.failures:
            code = self.server.failures.pop(0)
            self.reply(
                ENDPOINT_ERROR_STATUS[code],
                json.dumps({"message": f"fake {code} from the endpoint"}).encode(),
                {"x-amzn-ErrorType": f"{code}:http://internal.amazon.com/coral/com.amazon.sagemaker/"},
            )
        else:
            self.reply(200, self.server.answer_body, {})

    def reply(self, status: int, body: bytes, headers: dict[str, str]):
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass
