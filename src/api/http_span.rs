//! The HTTP server span, named and attributed by the current OpenTelemetry HTTP semantic
//! conventions (`http.request.method`, `http.route`, `url.path`, `url.scheme`,
//! `server.address`, `client.address`, `user_agent.original`, `network.protocol.version`,
//! `http.response.status_code`, `error.type`); tracing-actix-web's default root span still
//! uses the old names (`http.method`, `http.status_code`, ...). Its parent is the context the
//! configured propagator extracts from the request headers.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Version;
use opentelemetry::propagation::Extractor;
use tracing::Span;
use tracing::field::Empty;
use tracing_actix_web::RootSpanBuilder;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The root span of every request (see the module documentation).
pub struct SemconvRootSpan;

struct Headers<'a>(&'a actix_web::http::header::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

fn protocol_version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_11 => "1.1",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "",
    }
}

impl RootSpanBuilder for SemconvRootSpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        // Only standard methods reach here (`api::standard_methods_only` answers 405 first),
        // so the method is a closed set.
        let method = request.method().as_str();
        let route = request.match_pattern();
        let name = match &route {
            Some(r) => format!("{method} {r}"),
            None => method.to_owned(),
        };
        let info = request.connection_info();
        let (host, port) = match info.host().rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_owned(), p.parse::<i64>().ok()),
            _ => (info.host().to_owned(), None),
        };
        let span = tracing::info_span!(
            "HTTP request",
            otel.name = %name,
            otel.kind = "server",
            otel.status_code = Empty,
            http.request.method = %method,
            http.route = route.as_deref().unwrap_or(""),
            http.response.status_code = Empty,
            url.path = %request.path(),
            url.scheme = %info.scheme(),
            server.address = %host,
            server.port = port,
            client.address = %info.realip_remote_addr().unwrap_or(""),
            user_agent.original = request
                .headers()
                .get("User-Agent")
                .and_then(|h| h.to_str().ok())
                .unwrap_or(""),
            network.protocol.version = protocol_version(request.version()),
            error.type = Empty,
        );
        drop(info);
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&Headers(request.headers()))
        });
        let _ = span.set_parent(parent);
        span
    }

    fn on_request_end<B: MessageBody>(
        span: Span,
        outcome: &Result<ServiceResponse<B>, actix_web::Error>,
    ) {
        let status = match outcome {
            Ok(r) => r.response().status(),
            Err(e) => e.as_response_error().status_code(),
        };
        span.record("http.response.status_code", i64::from(status.as_u16()));
        // Server errors only: a 4xx is the client's (the HTTP conventions).
        if status.is_server_error() {
            span.record("error.type", status.as_str());
            span.record("otel.status_code", "ERROR");
        } else {
            span.record("otel.status_code", "OK");
        }
    }
}
