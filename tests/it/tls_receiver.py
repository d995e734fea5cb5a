"""OTLP trace receivers behind TLS for the tests, as managed backends stand: gRPC or
HTTP/protobuf, optionally requiring a client certificate signed by CLIENT_CA (mutual TLS).

Prints "<trace id> <span name>" per span, "metric <name>" per metric (gRPC) and, per request,
"request encoding=<grpc-encoding or Content-Encoding> api-key=<header> client=<client CN>".

gRPC: grpcio does not show a servicer the request's compression, so TLS ends in a proxy of
this script that reads the HTTP/2 frames on their way to the grpcio server and prints
"grpc-message compressed=<0|1>" per request message (the gRPC length prefix's flag).

Usage: python tls_receiver.py grpc|http PORT CERT KEY [CLIENT_CA]
(needs grpcio and opentelemetry-proto)."""
import gzip
import ssl
import sys
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

kind, port, cert_file, key_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
client_ca = sys.argv[5] if len(sys.argv) > 5 else None


def report(request, encoding, api_key, client):
    print(f"request encoding={encoding} api-key={api_key} client={client}", flush=True)
    for rs in request.resource_spans:
        for ss in rs.scope_spans:
            for s in ss.spans:
                print(s.trace_id.hex(), s.name, flush=True)


def h2_proxy(public_port, backend_port, ctx):
    """TLS on public_port; frames forwarded as they are to the plaintext backend."""
    import socket, threading

    def pump(src, dst, inspect):
        buf = b""
        preface = inspect
        first_data = set()
        try:
            while True:
                chunk = src.recv(65536)
                if not chunk:
                    break
                dst.sendall(chunk)
                if not inspect:
                    continue
                buf += chunk
                if preface:
                    if len(buf) < 24:
                        continue
                    buf, preface = buf[24:], False
                while len(buf) >= 9:
                    length = int.from_bytes(buf[0:3], "big")
                    ftype, flags = buf[3], buf[4]
                    stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                    if len(buf) < 9 + length:
                        break
                    payload = buf[9:9 + length]
                    buf = buf[9 + length:]
                    if ftype == 0 and stream not in first_data:
                        if flags & 0x8:
                            payload = payload[1:]
                        if payload:
                            first_data.add(stream)
                            print(f"grpc-message compressed={payload[0]}", flush=True)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    ctx.set_alpn_protocols(["h2"])
    listener = socket.create_server(("127.0.0.1", public_port))

    def serve():
        while True:
            raw, _ = listener.accept()
            try:
                conn = ctx.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError):
                raw.close()
                continue
            back = socket.create_connection(("127.0.0.1", backend_port))
            threading.Thread(target=pump, args=(conn, back, True), daemon=True).start()
            threading.Thread(target=pump, args=(back, conn, False), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()


if kind == "grpc":
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    class Svc(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            meta = dict(context.invocation_metadata())
            cn = "-"
            for k, v in (context.auth_context() or {}).items():
                if k == "x509_common_name" and v:
                    cn = v[0].decode()
            report(request, meta.get("grpc-encoding", "identity"), meta.get("api-key", "-"), cn)
            return trace_service_pb2.ExportTraceServiceResponse()

    from opentelemetry.proto.collector.metrics.v1 import (
        metrics_service_pb2,
        metrics_service_pb2_grpc,
    )

    class MetricsSvc(metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(self, request, context):
            meta = dict(context.invocation_metadata())
            print(f"request encoding={meta.get('grpc-encoding', 'identity')} "
                  f"api-key={meta.get('api-key', '-')} client=-", flush=True)
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        print(f"metric {m.name}", flush=True)
            return metrics_service_pb2.ExportMetricsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Svc(), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(MetricsSvc(), server)
    backend = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    h2_proxy(port, backend, ctx)
    print("listening", flush=True)
    server.wait_for_termination()
else:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            encoding = self.headers.get("Content-Encoding", "identity")
            if encoding == "gzip":
                body = gzip.decompress(body)
            req = trace_service_pb2.ExportTraceServiceRequest()
            req.ParseFromString(body)
            cn = "-"
            peer = self.connection.getpeercert()
            if peer:
                for rdn in peer.get("subject", ()):
                    for k, v in rdn:
                        if k == "commonName":
                            cn = v
            report(req, encoding, self.headers.get("api-key", "-"), cn)
            out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    print("listening", flush=True)
    httpd.serve_forever()
