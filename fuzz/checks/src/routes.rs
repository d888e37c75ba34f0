//! The route table: the JSON the captain streams (`RouteTable::from_json`),
//! the compiled table the edge swaps in, and the event-stream parser.

use edge::routes::{RouteTable, SseParser};
use edge::table::Routes;

/// A table that decodes is valid, survives a JSON round trip unchanged,
/// compiles, and routes each of its domains; the event-stream parser gives
/// the same events however the bytes are split.
pub fn table(data: &[u8]) {
    if let Ok(table) = RouteTable::from_json(data) {
        let again = RouteTable::from_json(&table.to_json())
            .unwrap_or_else(|e| panic!("a table the edge wrote does not decode: {e}"));
        assert_eq!(again, table, "JSON round trip");
        let routes = Routes::new();
        routes.replace(&table);
        let router = routes.load();
        for route in &table.routes {
            let probe = route
                .domain
                .strip_prefix("*.")
                .map_or_else(|| route.domain.clone(), |d| format!("x.{d}"));
            assert!(
                router.lookup(&probe).is_some(),
                "{probe} is in the table but not routed"
            );
        }
    }

    let events = |parts: &[&[u8]]| {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for part in parts {
            match p.push(part) {
                Ok(ev) => out.extend(ev),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(out)
    };
    let mid = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let (a, b) = data.split_at(mid);
    assert_eq!(events(&[data]), events(&[a, b]), "events split at {mid}");
}
