//! HAProxy's runtime API on a unix stats socket: one command per connection (HAProxy's
//! non-interactive mode answers one line and closes), each bounded by a timeout so a wedged
//! proxy cannot stall a pass.

use crate::live::LiveError;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest wait for one command's answer.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// A client of one admin socket.
#[derive(Debug, Clone)]
pub struct Cli {
    socket: PathBuf,
}

/// What `show info` says about the process that answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// The worker's process id (it changes with every reload).
    pub pid: u32,
    /// Seconds since that worker started.
    pub uptime_secs: u64,
    /// The worker is an old one finishing its connections after a reload.
    pub stopping: bool,
}

/// One server as the running process has it (`show servers state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    /// Server name.
    pub name: String,
    /// Its address and port, when it has an IP address.
    pub addr: Option<(IpAddr, u16)>,
    /// Administrative state bits (`srv_admin_state`).
    pub admin: u32,
}

impl Running {
    /// Maintenance (forced, inherited, from the config or DNS) or drain: it takes no new
    /// traffic, so a leftover one is harmless.
    pub fn idle_by_admin(&self) -> bool {
        self.admin & (0x01 | 0x02 | 0x04 | 0x08 | 0x10 | 0x20) != 0
    }
}

impl Cli {
    /// A client of the socket at `socket`.
    pub fn new(socket: &Path) -> Cli {
        Cli {
            socket: socket.to_path_buf(),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn endpoint(&self) -> String {
        format!("HAProxy socket {}", self.socket.display())
    }

    fn refused(&self, command: &str, answer: &str) -> LiveError {
        LiveError::Refused {
            endpoint: self.endpoint(),
            reason: format!("`{command}`: {}", one_line(answer)),
        }
    }

    /// Sends one command and returns the raw answer.
    pub async fn send(&self, command: &str) -> Result<String, LiveError> {
        let talk = async {
            let mut s = tokio::net::UnixStream::connect(&self.socket).await?;
            s.write_all(format!("{command}\n").as_bytes()).await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            Ok::<_, std::io::Error>(out)
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, talk).await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => Err(LiveError::Unreachable {
                endpoint: self.endpoint(),
                reason: format!("`{command}`: {e}"),
            }),
            Err(_) => Err(LiveError::Timeout {
                endpoint: self.endpoint(),
                after: COMMAND_TIMEOUT,
            }),
        }
    }

    /// Sends a command that changes state and fails unless HAProxy says it was done.
    pub async fn run(&self, command: &str) -> Result<(), LiveError> {
        let answer = self.send(command).await?;
        if accepted(command, &answer) {
            tracing::debug!(socket = %self.socket.display(), command, "runtime command done");
            Ok(())
        } else {
            Err(self.refused(command, &answer))
        }
    }

    /// `show info`.
    pub async fn info(&self) -> Result<Info, LiveError> {
        let answer = self.send("show info").await?;
        parse_info(&answer).ok_or_else(|| self.refused("show info", &answer))
    }

    /// `show servers state BACKEND`.
    pub async fn servers(&self, backend: &str) -> Result<Vec<Running>, LiveError> {
        let command = format!("show servers state {backend}");
        let answer = self.send(&command).await?;
        parse_servers_state(&answer).ok_or_else(|| self.refused(&command, &answer))
    }

    /// Sessions on a server, queued ones included (`scur` + `qcur` of `show stat`); `None`
    /// when the running process has no such server.
    pub async fn sessions(&self, backend: &str, server: &str) -> Result<Option<u64>, LiveError> {
        let command = format!("show stat {backend} 4 -1");
        let answer = self.send(&command).await?;
        if answer.starts_with("No such proxy") {
            // The backend itself is gone (a reload dropped it): so is the server.
            return Ok(None);
        }
        parse_sessions(&answer, server).map_err(|()| self.refused(&command, &answer))
    }
}

/// The answer, on one line for a log or error line.
fn one_line(answer: &str) -> String {
    let t = answer.split_whitespace().collect::<Vec<_>>().join(" ");
    if t.is_empty() {
        "(empty answer)".into()
    } else {
        t
    }
}

/// Whether HAProxy's answer to `command` says it was done. Commands that succeed silently
/// answer nothing; those that report success have a fixed message (HAProxy 2.6 `cli.c`,
/// `server.c`).
pub fn accepted(command: &str, answer: &str) -> bool {
    let a = answer.trim();
    if command.starts_with("add server ") {
        a.contains("New server registered")
    } else if command.starts_with("del server ") {
        a.contains("Server deleted")
    } else if command.starts_with("set ssl cert ") {
        a.starts_with("Transaction created for certificate ")
            || a.starts_with("Transaction updated for certificate ")
    } else if command.starts_with("commit ssl cert ") {
        a.ends_with("Success!")
    } else if command.starts_with("set server ") && command.contains(" addr ") {
        a.contains("changed from") || a.starts_with("no need to change")
    } else {
        a.is_empty()
    }
}

/// Whether a refusal means the server does not exist.
pub fn no_such_server(e: &LiveError) -> bool {
    matches!(e, LiveError::Refused { reason, .. } if reason.contains("No such server"))
}

fn parse_info(answer: &str) -> Option<Info> {
    let field = |k: &str| {
        answer
            .lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(':').map(str::trim))
    };
    Some(Info {
        pid: field("Pid")?.parse().ok()?,
        uptime_secs: field("Uptime_sec")?.parse().ok()?,
        stopping: field("Stopping").is_some_and(|s| s != "0"),
    })
}

fn parse_servers_state(answer: &str) -> Option<Vec<Running>> {
    let mut lines = answer.lines().filter(|l| !l.trim().is_empty());
    if lines.next()?.trim() != "1" {
        return None;
    }
    let header: Vec<&str> = lines
        .next()?
        .trim_start_matches('#')
        .split_whitespace()
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (name, addr, port, admin) = (
        col("srv_name")?,
        col("srv_addr")?,
        col("srv_port")?,
        col("srv_admin_state")?,
    );
    lines
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let ip = f.get(addr)?.parse::<IpAddr>().ok();
            let port = f.get(port)?.parse::<u16>().ok();
            Some(Running {
                name: f.get(name)?.to_string(),
                addr: ip.zip(port),
                admin: f.get(admin)?.parse().ok()?,
            })
        })
        .collect()
}

fn parse_sessions(answer: &str, server: &str) -> Result<Option<u64>, ()> {
    let mut lines = answer.lines();
    let header: Vec<&str> = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .ok_or(())?
        .split(',')
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name).ok_or(());
    let (sv, scur, qcur) = (col("svname")?, col("scur")?, col("qcur")?);
    for l in lines {
        let f: Vec<&str> = l.split(',').collect();
        if f.get(sv) == Some(&server) {
            let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            return Ok(Some(n(scur) + n(qcur)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_judged_per_command() {
        let cases = [
            ("add server web/a 1.2.3.4:80", "New server registered.\n\n", true),
            ("add server web/a 1.2.3.4:80", "Already exists a server with the same name in backend.\n", false),
            ("add server web/a 1.2.3.4:80 cookie a", "'cookie' option is not accepted for dynamic server\n", false),
            ("del server web/a", "Server deleted.\n", true),
            ("del server web/a", "Only servers in maintenance mode can be deleted.\n", false),
            ("set server web/a addr 10.0.0.2 port 81", "IP changed from '127.0.0.1' to '10.0.0.2', port changed from '80' to '81' by 'stats socket command'\n", true),
            ("set server web/a addr 10.0.0.2 port 81", "no need to change the addr, port changed from '80' to '81' by 'stats socket command'\n", true),
            ("set server web/a addr 10.0.0.2 port 81", "No such server.\n", false),
            ("set server web/a state drain", "\n", true),
            ("set server web/a state drain", "No such server.\n", false),
            ("enable health web/a", "Health check was not configured on this server, cannot enable.\n", false),
            ("enable server web/a", "Permission denied\n", false),
            ("set ssl cert /s/a.pem <<\nPEM\n", "Transaction created for certificate /s/a.pem!\n\n", true),
            ("set ssl cert /s/a.pem <<\nPEM\n", "Transaction updated for certificate /s/a.pem!\n\n", true),
            ("set ssl cert /s/a.pem <<\nx\n", "unable to load certificate from file '/s/a.pem'.\nCan't load the payload\nCan't update /s/a.pem!\n\n", false),
            ("set ssl cert /s/n.pem <<\nPEM\n", "Can't replace a certificate which is not referenced by the configuration!\nCan't update /s/n.pem!\n", false),
            ("commit ssl cert /s/a.pem", "Committing /s/a.pem.\nSuccess!\n\n", true),
            ("commit ssl cert /s/a.pem", "No ongoing transaction! !\nCan't commit /s/a.pem!\n\n", false),
        ];
        for (cmd, answer, ok) in cases {
            assert_eq!(accepted(cmd, answer), ok, "{cmd}: {answer}");
        }
    }

    #[test]
    fn parses_haproxy_2_6_answers() {
        // Captured from HAProxy 2.6.12.
        let info = "Name: HAProxy\nVersion: 2.6.12-1+deb12u4\nPid: 18625\nUptime: 0d 0h00m12s\nUptime_sec: 12\nnode: vm\nStopping: 0\n";
        assert_eq!(
            parse_info(info),
            Some(Info {
                pid: 18625,
                uptime_secs: 12,
                stopping: false
            })
        );
        assert_eq!(parse_info("Unknown command.\n"), None);

        let state = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n\
3 svc_web 1 a 127.0.0.1 2 0 1 1 4 8 2 0 6 0 0 0 - 18001 - 0 0 - - 0\n\
3 svc_web 2 v6 ::1 0 9 1 1 1 1 0 0 0 0 0 0 - 18010 - 0 0 - - 0\n\n";
        let s = parse_servers_state(state).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].addr, Some(("127.0.0.1".parse().unwrap(), 18001)));
        assert!(!s[0].idle_by_admin());
        assert_eq!(s[1].name, "v6");
        assert!(s[1].idle_by_admin());
        assert_eq!(parse_servers_state("1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_port\n"), Some(vec![]));
        assert_eq!(parse_servers_state("Can't find backend.\n"), None);

        let stat = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,status\nsvc_web,a,1,0,2,3,,9,UP\nsvc_web,b,0,0,0,1,,4,DRAIN\n\n";
        assert_eq!(parse_sessions(stat, "a"), Ok(Some(3)));
        assert_eq!(parse_sessions(stat, "b"), Ok(Some(0)));
        assert_eq!(parse_sessions(stat, "c"), Ok(None));
        assert_eq!(parse_sessions("No such proxy.\n", "a"), Err(()));
    }
}
