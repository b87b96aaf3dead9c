//! The dashboard: static assets built into the binary (no runtime file access, no CDN), served
//! at `GET /` and `GET /assets/{file}` with a strict Content-Security-Policy.
//!
//! The page itself (`dashboard/`) is plain HTML, CSS and one ES module; the charts use uPlot,
//! vendored in `dashboard/vendor/` with its licence.

use std::sync::OnceLock;

use salvo::http::header::{self, HeaderValue};
use salvo::prelude::*;

use crate::web::ApiError;

/// Only our own origin, no inline script or style, no framing, no plugins. `connect-src 'self'`
/// covers `/events`, the API and the same-origin WebSocket.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     font-src 'self'; connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

/// How a file may be cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Caching {
    /// Revalidated on every load (by ETag): our own files change with every release.
    Revalidate,
    /// Third-party files, which change only when the vendored version does.
    Day,
}

/// One embedded file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
    caching: Caching,
}

/// Every file: `index.html` first (served at `/`), then those under `/assets/`.
static FILES: [Asset; 7] = [
    Asset {
        path: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../dashboard/index.html"),
        caching: Caching::Revalidate,
    },
    Asset {
        path: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../dashboard/app.js"),
        caching: Caching::Revalidate,
    },
    Asset {
        path: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../dashboard/app.css"),
        caching: Caching::Revalidate,
    },
    Asset {
        path: "icon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../dashboard/icon.svg"),
        caching: Caching::Revalidate,
    },
    Asset {
        path: "vendor/uPlot.iife.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../dashboard/vendor/uPlot.iife.min.js"),
        caching: Caching::Day,
    },
    Asset {
        path: "vendor/uPlot.min.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../dashboard/vendor/uPlot.min.css"),
        caching: Caching::Day,
    },
    Asset {
        path: "vendor/LICENSE",
        content_type: "text/plain; charset=utf-8",
        body: include_bytes!("../dashboard/vendor/LICENSE"),
        caching: Caching::Day,
    },
];

/// The dashboard's routes: `GET /`, `GET /assets/{**file}` and `GET /favicon.ico`. Push it into the main router
/// before any catch-all route.
pub fn router() -> Router {
    Router::new()
        .push(Router::new().get(index).head(index))
        .push(Router::with_path("favicon.ico").get(favicon))
        .push(Router::with_path("assets/{**file}").get(asset))
}

#[handler]
async fn index(req: &mut Request, res: &mut Response) {
    serve(0, req, res);
}

/// Browsers ask for `/favicon.ico` on any page of the origin (even `/healthz`).
#[handler]
async fn favicon(req: &mut Request, res: &mut Response) {
    if let Some(i) = FILES.iter().position(|a| a.path == "icon.svg") {
        serve(i, req, res);
    }
}

#[handler]
async fn asset(req: &mut Request, res: &mut Response) {
    let file = req.param::<String>("file").unwrap_or_default();
    match FILES.iter().skip(1).position(|a| a.path == file) {
        Some(i) => serve(i + 1, req, res),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no dashboard asset {file:?}"),
        )
        .render(res),
    }
}

fn serve(i: usize, req: &Request, res: &mut Response) {
    let a = &FILES[i];
    let etag = etag(i);
    let h = res.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(match a.caching {
            Caching::Revalidate => "no-cache",
            Caching::Day => "public, max-age=86400",
        }),
    );
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if fresh {
        res.status_code(StatusCode::NOT_MODIFIED);
        return;
    }
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(a.content_type),
    );
    res.body(a.body);
}

/// A strong ETag from the content of `FILES[i]` (FNV-1a, computed once).
fn etag(i: usize) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        FILES
            .iter()
            .map(|a| format!("\"{:016x}\"", fnv1a(a.body)))
            .collect()
    });
    &tags[i]
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_its_embedded_assets_and_nothing_inline_or_remote() {
        let html = std::str::from_utf8(FILES[0].body).expect("utf-8");
        for a in FILES.iter().skip(1).filter(|a| a.path != "vendor/LICENSE") {
            assert!(
                html.contains(&format!("\"assets/{}\"", a.path)),
                "index.html should reference assets/{}",
                a.path
            );
        }
        assert!(!html.contains("<script>"), "no inline scripts (CSP)");
        assert!(!html.contains(" style="), "no inline styles (CSP)");
        assert!(!html.contains("http://") && !html.contains("https://"));
    }

    #[test]
    fn every_file_has_its_own_etag() {
        let tags: std::collections::HashSet<_> = (0..FILES.len()).map(etag).collect();
        assert_eq!(tags.len(), FILES.len());
        assert!(etag(0).starts_with('"') && etag(0).ends_with('"'));
    }
}
