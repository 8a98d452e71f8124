//! The API's routes as one table: which method and path pattern reach which operation.
//!
//! The table is data so that the OpenAPI document can be checked against it (every route documented,
//! nothing documented that is not served) and so that a wrong method is told apart from an unknown path
//! (405 with the allowed methods, not 404).

use hyper::Method;

/// Every operation of the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    Health,
    OpenApi,
    Metrics,
    Instance,
    VolumeCreate,
    VolumeList,
    VolumeInspect,
    VolumeDelete,
    VolumeExpand,
    VolumeAttach,
    VolumeDetach,
    VolumeQos,
    SnapshotCreate,
    SnapshotList,
    SnapshotDelete,
    SnapshotRevert,
    NodeList,
    NodeInspect,
    NodeCordon,
    NodeUncordon,
    NodeDrain,
}

/// One route: method, path pattern (`{param}` segments capture), operation.
pub struct Route {
    pub method: Method,
    pub pattern: &'static str,
    pub operation: Operation,
}

/// The routes, in the order the OpenAPI document lists them.
pub fn routes() -> Vec<Route> {
    use Operation::*;
    let r = |method: Method, pattern, operation| Route {
        method,
        pattern,
        operation,
    };
    vec![
        r(Method::GET, "/v1/health", Health),
        r(Method::GET, "/v1/openapi.json", OpenApi),
        r(Method::GET, "/metrics", Metrics),
        r(Method::GET, "/v1/instance", Instance),
        r(Method::POST, "/v1/volumes", VolumeCreate),
        r(Method::GET, "/v1/volumes", VolumeList),
        r(Method::GET, "/v1/volumes/{name}", VolumeInspect),
        r(Method::DELETE, "/v1/volumes/{name}", VolumeDelete),
        r(Method::POST, "/v1/volumes/{name}/expand", VolumeExpand),
        r(Method::POST, "/v1/volumes/{name}/attach", VolumeAttach),
        r(Method::POST, "/v1/volumes/{name}/detach", VolumeDetach),
        r(Method::PUT, "/v1/volumes/{name}/qos", VolumeQos),
        r(Method::POST, "/v1/volumes/{name}/snapshots", SnapshotCreate),
        r(Method::GET, "/v1/volumes/{name}/snapshots", SnapshotList),
        r(
            Method::DELETE,
            "/v1/volumes/{name}/snapshots/{snapshot}",
            SnapshotDelete,
        ),
        r(
            Method::POST,
            "/v1/volumes/{name}/snapshots/{snapshot}/revert",
            SnapshotRevert,
        ),
        r(Method::GET, "/v1/nodes", NodeList),
        r(Method::GET, "/v1/nodes/{name}", NodeInspect),
        r(Method::POST, "/v1/nodes/{name}/cordon", NodeCordon),
        r(Method::POST, "/v1/nodes/{name}/uncordon", NodeUncordon),
        r(Method::POST, "/v1/nodes/{name}/drain", NodeDrain),
    ]
}

/// What a request's method and path lead to.
#[derive(Debug, PartialEq, Eq)]
pub enum Matched {
    /// The operation, its pattern (for metrics labels) and the captured path parameters in order.
    Found {
        operation: Operation,
        pattern: &'static str,
        params: Vec<String>,
    },
    /// The path exists, not with this method; the methods it has.
    WrongMethod(Vec<Method>),
    NotFound,
}

/// Captures of `path` against `pattern`, if it matches.
fn captures(pattern: &str, path: &str) -> Option<Vec<String>> {
    let mut want = pattern.split('/');
    let mut have = path.split('/');
    let mut params = Vec::new();
    loop {
        match (want.next(), have.next()) {
            (None, None) => return Some(params),
            (Some(w), Some(h)) if w.starts_with('{') => params.push(h.to_string()),
            (Some(w), Some(h)) if w == h => {}
            _ => return None,
        }
    }
}

/// Route a request (a pure function of the table).
pub fn route(method: &Method, path: &str) -> Matched {
    let mut allowed = Vec::new();
    for r in routes() {
        if let Some(params) = captures(r.pattern, path) {
            if r.method == *method {
                return Matched::Found {
                    operation: r.operation,
                    pattern: r.pattern,
                    params,
                };
            }
            allowed.push(r.method);
        }
    }
    if allowed.is_empty() {
        Matched::NotFound
    } else {
        Matched::WrongMethod(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_capture_their_parameters() {
        assert_eq!(
            route(&Method::POST, "/v1/volumes/v1/snapshots/s1/revert"),
            Matched::Found {
                operation: Operation::SnapshotRevert,
                pattern: "/v1/volumes/{name}/snapshots/{snapshot}/revert",
                params: vec!["v1".into(), "s1".into()],
            }
        );
        assert!(matches!(
            route(&Method::GET, "/v1/volumes"),
            Matched::Found {
                operation: Operation::VolumeList,
                ..
            }
        ));
    }

    #[test]
    fn a_known_path_with_another_method_is_not_a_missing_path() {
        assert_eq!(
            route(&Method::PATCH, "/v1/volumes/a"),
            Matched::WrongMethod(vec![Method::GET, Method::DELETE])
        );
        assert_eq!(route(&Method::GET, "/v1/volumes/a/b"), Matched::NotFound);
        assert_eq!(
            route(&Method::GET, "/v1/volumes/"),
            Matched::Found {
                operation: Operation::VolumeInspect,
                pattern: "/v1/volumes/{name}",
                params: vec![String::new()],
            }
        );
        assert_eq!(route(&Method::GET, "/v2/health"), Matched::NotFound);
    }

    #[test]
    fn no_two_routes_share_a_method_and_pattern() {
        let all = routes();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert!(
                    !(a.method == b.method && a.pattern == b.pattern),
                    "{} {}",
                    a.method,
                    a.pattern
                );
            }
        }
    }
}
