//! Each injected pod's copy of the user's `proxy.toml`: the same file, comments and all,
//! with the addresses only the pod can know set for it (and the upstream's protocol, when
//! the pod says which).

use std::net::{IpAddr, SocketAddr};

use toml_edit::{DocumentMut, Item, Table, Value};

use crate::config::env;

/// What one pod's gatehouse needs set.
pub struct ForPod<'a> {
    /// The IP both listeners bind: the user's when it is a wildcard, else all IPv4
    /// interfaces (the Service and the kubelet reach the pod IP).
    pub listen_ip: IpAddr,
    pub admin_ip: IpAddr,
    pub port: u16,
    pub admin: u16,
    /// Where gatehouse reaches the app.
    pub app: App<'a>,
    /// `upstream.protocol`, when the pod says what its app speaks.
    pub protocol: Option<&'a str>,
}

/// Where the app listens, as gatehouse in the pod reaches it.
#[derive(Clone, Copy)]
pub enum App<'a> {
    /// Its port, on loopback.
    Port(u16),
    /// A Unix socket in the volume both containers mount.
    Socket(&'a str),
}

/// `source` with `server.listen`, `admin.listen`, `upstream.url` (and `upstream.protocol`)
/// set, `[admin]` added when absent, and a header saying so; `file` names the original.
pub fn for_pod(source: &str, file: &str, a: &ForPod) -> Result<String, String> {
    let mut doc: DocumentMut = source
        .parse()
        .map_err(|e| format!("{file}: cannot edit the config: {e}"))?;
    let note = " # set by gatehouse inject";
    set(
        &mut doc,
        "server",
        "listen",
        SocketAddr::new(a.listen_ip, a.port).to_string(),
        note,
    )?;
    set(
        &mut doc,
        "admin",
        "listen",
        SocketAddr::new(a.admin_ip, a.admin).to_string(),
        note,
    )?;
    let (url, note) = match a.app {
        App::Port(port) => (
            format!("http://127.0.0.1:{port}"),
            " # set by gatehouse inject: the app's port, on loopback",
        ),
        App::Socket(path) => (
            format!("unix:{path}"),
            " # set by gatehouse inject: the app's Unix socket",
        ),
    };
    set(&mut doc, "upstream", "url", url, note)?;
    if let Some(protocol) = a.protocol {
        set(
            &mut doc,
            "upstream",
            "protocol",
            protocol.to_owned(),
            " # set by gatehouse inject: what the app speaks",
        )?;
    }
    Ok(format!(
        "# This pod's copy of {file}, written by `gatehouse inject`: server.listen, admin.listen\n\
         # and upstream.url (and protocol) are set for the pod; the rest is as it was.\n{doc}"
    ))
}

/// The variables the config reads as `${VAR}` with no default, in order: gatehouse in the
/// pod needs them in its environment, which inject has no way to fill (they are often
/// secrets).
pub fn required_env(source: &str) -> Vec<String> {
    source
        .parse::<toml::Value>()
        .map(|value| env::required(&value))
        .unwrap_or_default()
}

fn set(
    doc: &mut DocumentMut,
    table: &str,
    key: &str,
    text: String,
    note: &str,
) -> Result<(), String> {
    if !doc.contains_key(table) {
        let mut new = Table::new();
        new.decor_mut().set_prefix("\n");
        doc.insert(table, Item::Table(new));
    }
    // An inline table cannot hold a comment.
    let inline = doc[table].is_inline_table();
    let section = doc[table]
        .as_table_like_mut()
        .ok_or_else(|| format!("{table} is not a table"))?;
    let mut value = Value::from(text);
    value.decor_mut().set_prefix(" ");
    if !inline {
        value.decor_mut().set_suffix(note);
    }
    // In place, so the comments above the key stay.
    match section.get_mut(key) {
        Some(item) => *item = Item::Value(value),
        None => {
            section.insert(key, Item::Value(value));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;
    use std::path::Path;

    const ADDR: ForPod = ForPod {
        listen_ip: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        admin_ip: IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        port: 8081,
        admin: 9901,
        app: App::Port(3000),
        protocol: None,
    };

    #[test]
    fn sets_the_pod_addresses_and_keeps_the_rest() {
        let source = "# my proxy\n[server]\nlisten = \"127.0.0.1:8080\" # public\nshutdown_delay = \"5s\"\n\n[upstream]\n# the app\nurl = \"${APP_URL:-http://127.0.0.1:8000}\"\ntimeout = \"9s\"\n\n[[middleware]]\ntype = \"request_id\"\n";
        let out = for_pod(source, "proxy.toml", &ADDR).unwrap();
        assert!(
            out.contains(
                "# my proxy\n[server]\nlisten = \"0.0.0.0:8081\" # set by gatehouse inject\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("# the app\nurl = \"http://127.0.0.1:3000\""),
            "{out}"
        );
        assert!(out.contains("[admin]\nlisten = \"[::]:9901\""), "{out}");
        let config = Config::parse(Path::new("proxy.toml"), &out, &|_| None).unwrap();
        assert_eq!(config.server.listen.0.port(), 8081);
        assert_eq!(config.upstream.url.to_string(), "http://127.0.0.1:3000");
        assert_eq!(config.upstream.timeout.to_string(), "9s");
        assert_eq!(config.admin.unwrap().listen.0.port(), 9901);
        assert_eq!(config.middleware.len(), 1);
    }

    #[test]
    fn finds_the_variables_without_a_default() {
        let source = "# ${NOT_IN_A_COMMENT}\n[a]\nk = \"${KEY}\"\nd = \"${HAS:-x}\"\ne = \"$${ESCAPED} $5\"\nlist = [{ v = \"${KEY}-${OTHER}\" }]\n";
        assert_eq!(required_env(source), ["KEY", "OTHER"]);
    }

    #[test]
    fn inline_tables_are_edited_in_place() {
        let source = "server = { listen = \"0.0.0.0:1\" }\nupstream = { url = \"http://127.0.0.1:2\" }\nadmin = { listen = \"0.0.0.0:3\", upstream_check = \"2s\" }\n";
        let h2c = ForPod {
            protocol: Some("h2c"),
            app: App::Socket("/run/app/app.sock"),
            ..ADDR
        };
        let out = for_pod(source, "p.toml", &h2c).unwrap();
        let config = Config::parse(Path::new("p.toml"), &out, &|_| None).unwrap();
        assert_eq!(config.server.listen.0.port(), 8081);
        assert_eq!(config.upstream.url.to_string(), "unix:/run/app/app.sock");
        assert_eq!(config.upstream.protocol.to_string(), "h2c");
        let admin = config.admin.unwrap();
        assert_eq!(admin.listen.0.port(), 9901);
        assert!(admin.upstream_check.is_some());
    }
}
