//! `cargo xtask run`: the agent on a local Kubernetes cluster, in place of kube-proxy.
//!
//! Builds the release agent into an image (deploy/Dockerfile), makes a kind cluster without
//! kube-proxy (deploy/kind.yaml) unless it exists, loads the image into its nodes, deploys the
//! agent as a DaemonSet (deploy/agent.yaml) and the seed's Services with pods behind them
//! (deploy/demo.yaml), then says how to send traffic through it. `cargo xtask run --delete`
//! removes the cluster.
//!
//! This needs Docker and kind, which the project's build machines do not have: the tools are
//! checked before anything else, so that a machine without them gets one message naming all of
//! them rather than a failure after a long release build.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail, ensure};

use crate::cmd::{self, CommandError};
use crate::setup;

/// The kind cluster's name. deploy/agent.yaml names its control-plane node
/// (`<CLUSTER>-control-plane`) as the API server's address; a test keeps the two equal.
const CLUSTER: &str = "proxy-dev";

/// The image tag deploy/agent.yaml runs. It is only ever loaded into the nodes, never pushed.
const IMAGE: &str = "proxy-agent:dev";

const NAMESPACE: &str = "proxy-system";
const DAEMONSET: &str = "ds/proxy-agent";
/// The Deployments of deploy/demo.yaml, waited for so that the first request has backends.
const DEMO_DEPLOYMENTS: &[&str] = &["deployment/kubia", "deployment/bar"];

/// `cargo xtask run`.
pub fn run() -> Result<()> {
    require(&[Tool::DockerEngine, Tool::Kind, Tool::Kubectl])?;
    setup::setup()?;
    let agent = build_release_agent()?;
    build_image(&agent)?;
    ensure_cluster()?;

    step(&format!("loading {IMAGE} into the nodes of {CLUSTER}"));
    cmd::run(Command::new("kind").args(["load", "docker-image", IMAGE, "--name", CLUSTER]))?;

    step("deploying proxy-agent (deploy/agent.yaml)");
    let applied = cmd::output(
        kubectl()
            .args(["apply", "-f"])
            .arg(deploy_file("agent.yaml")),
    )?;
    print!("{applied}");
    if daemonset_unchanged(&applied) {
        // The tag stays `proxy-agent:dev` across builds, so an unchanged manifest starts no
        // rollout by itself; the pods must be replaced to run the image just loaded.
        cmd::run(kubectl().args(["-n", NAMESPACE, "rollout", "restart", DAEMONSET]))?;
    }

    step("deploying the demo Services and their pods (deploy/demo.yaml)");
    print!(
        "{}",
        cmd::output(
            kubectl()
                .args(["apply", "-f"])
                .arg(deploy_file("demo.yaml"))
        )?
    );

    step("waiting for proxy-agent on every node");
    on_terminal(
        "the proxy-agent rollout",
        kubectl().args([
            "-n",
            NAMESPACE,
            "rollout",
            "status",
            DAEMONSET,
            "--timeout=120s",
        ]),
    )?;
    for deployment in DEMO_DEPLOYMENTS {
        // Longer than the agent's wait: the nodes pull the echo image from registry.k8s.io.
        on_terminal(
            deployment,
            kubectl().args(["rollout", "status", deployment, "--timeout=180s"]),
        )?;
    }
    print_how_to_try();
    Ok(())
}

/// `cargo xtask run --delete`. kind reports success for a cluster that does not exist, so a second
/// delete is harmless.
pub fn delete() -> Result<()> {
    require(&[Tool::DockerEngine, Tool::Kind])?;
    step(&format!("deleting kind cluster {CLUSTER}"));
    on_terminal(
        "deleting the cluster",
        Command::new("kind").args(["delete", "cluster", "--name", CLUSTER]),
    )
}

/// A program this command needs from the user's machine.
#[derive(Clone, Copy)]
enum Tool {
    DockerEngine,
    Kind,
    Kubectl,
}

/// Why a [`Tool`] is not usable.
enum Problem {
    NotOnPath,
    /// The program starts but fails; the text says how (for Docker: the engine is unreachable).
    Failing(String),
}

impl Tool {
    /// The program and the arguments whose success means the tool is usable. For Docker that is
    /// `docker info`, which asks the engine: the CLI alone cannot build or run anything.
    fn probe_command(self) -> Command {
        let (program, args): (&str, &[&str]) = match self {
            Self::DockerEngine => ("docker", &["info"]),
            Self::Kind => ("kind", &["version"]),
            Self::Kubectl => ("kubectl", &["version", "--client"]),
        };
        let mut command = Command::new(program);
        command.args(args);
        command
    }

    /// `None` when the tool is usable.
    fn probe(self) -> Option<Problem> {
        match cmd::output(&mut self.probe_command()) {
            Ok(_) => None,
            Err(err) if err.is_not_found() => Some(Problem::NotOnPath),
            Err(err) => Some(Problem::Failing(last_line(&err))),
        }
    }

    /// One entry of the prerequisite report: what is missing, why, and where to get it.
    fn describe(self, problem: &Problem) -> String {
        let (name, install) = match self {
            Self::DockerEngine => (
                "a reachable Docker engine",
                "https://docs.docker.com/engine/install/",
            ),
            Self::Kind => (
                "kind on PATH",
                "https://kind.sigs.k8s.io/docs/user/quick-start/#installation",
            ),
            Self::Kubectl => (
                "kubectl on PATH",
                "https://kubernetes.io/docs/tasks/tools/#kubectl",
            ),
        };
        let probe = self.probe_command();
        let why = match problem {
            Problem::NotOnPath => format!("`{}` is not on PATH", probe.get_program().display()),
            Problem::Failing(error) => format!("`{}` failed: {error}", display(&probe)),
        };
        format!("{name}: {why}\n    install: {install}")
    }
}

/// A command as the user would type it, to rerun by hand.
fn display(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|word| word.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last non-empty stderr line of a failed probe: where docker puts "Cannot connect to the
/// Docker daemon", after pages of client information.
fn last_line(err: &CommandError) -> String {
    err.stderr()
        .lines()
        .rev()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .map_or_else(|| err.to_string(), str::to_owned)
}

/// Probes every tool, then fails with one message naming all that are missing.
fn require(tools: &[Tool]) -> Result<()> {
    let found: Vec<(Tool, Option<Problem>)> =
        tools.iter().map(|&tool| (tool, tool.probe())).collect();
    match prerequisite_report(&found) {
        Some(report) => bail!(report),
        None => Ok(()),
    }
}

/// The error message for the tools that are not usable, or `None` when all are. Pure, so that
/// the message can be tested for every combination without the tools.
fn prerequisite_report(found: &[(Tool, Option<Problem>)]) -> Option<String> {
    let missing: Vec<String> = found
        .iter()
        .filter_map(|(tool, problem)| Some(format!("  - {}", tool.describe(problem.as_ref()?))))
        .collect();
    if missing.is_empty() {
        return None;
    }
    Some(format!(
        "cargo xtask run works on a local kind cluster: it needs Docker, kind and kubectl on this \
         machine. Missing:\n{}\nNothing was built or changed.",
        missing.join("\n")
    ))
}

/// `cargo build --release -p proxy-agent`, returning the binary's path as cargo reports it (so
/// that `CARGO_TARGET_DIR` and `build.target-dir` are honoured without reimplementing them).
fn build_release_agent() -> Result<PathBuf> {
    step("building proxy-agent (release; the first build takes a few minutes)");
    let messages = cmd::output(cmd::cargo().args([
        "build",
        "--release",
        "--package",
        "proxy-agent",
        "--message-format=json",
    ]))?;
    agent_executable(&messages).context("cargo built proxy-agent but reported no executable for it")
}

/// The `executable` of the proxy-agent binary in cargo's JSON messages (one object a line).
fn agent_executable(messages: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .filter(|message| message["target"]["name"] == "proxy-agent")
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
}

/// Builds [`IMAGE`] from deploy/Dockerfile. The context is a directory holding only the binary:
/// given the whole target directory, docker would first copy gigabytes to the engine.
fn build_image(agent: &Path) -> Result<()> {
    let context = agent
        .parent()
        .context("the agent binary has no parent directory")?
        .join("image");
    fs::create_dir_all(&context).with_context(|| format!("creating {}", context.display()))?;
    let staged = context.join("proxy-agent");
    fs::copy(agent, &staged)
        .with_context(|| format!("copying {} to {}", agent.display(), staged.display()))?;
    step(&format!("building image {IMAGE}"));
    cmd::run(
        Command::new("docker")
            .args(["build", "--tag", IMAGE, "--file"])
            .arg(deploy_file("Dockerfile"))
            .arg(&context),
    )?;
    Ok(())
}

/// Creates the kind cluster unless it exists. An existing one is reused as it is: recreating
/// it would cost minutes and throw away whatever the user deployed.
fn ensure_cluster() -> Result<()> {
    let clusters = cmd::output(Command::new("kind").args(["get", "clusters"]))?;
    if clusters.lines().any(|line| line.trim() == CLUSTER) {
        println!("ok: kind cluster {CLUSTER}");
        return Ok(());
    }
    step(&format!(
        "creating kind cluster {CLUSTER} without kube-proxy (deploy/kind.yaml)"
    ));
    on_terminal(
        "creating the cluster",
        Command::new("kind")
            .args(["create", "cluster", "--name", CLUSTER, "--config"])
            .arg(deploy_file("kind.yaml")),
    )
}

/// Whether `kubectl apply` left the DaemonSet as it was (`daemonset.apps/proxy-agent unchanged`).
fn daemonset_unchanged(apply_output: &str) -> bool {
    apply_output
        .lines()
        .any(|line| line.trim() == "daemonset.apps/proxy-agent unchanged")
}

/// kubectl bound to the kind cluster's context, so that a current context pointing elsewhere
/// (a real cluster, say) is never the one changed.
fn kubectl() -> Command {
    let mut kubectl = Command::new("kubectl");
    kubectl.args(["--context", &format!("kind-{CLUSTER}")]);
    kubectl
}

fn deploy_file(name: &str) -> PathBuf {
    cmd::workspace_root().join("deploy").join(name)
}

/// Runs a step whose own progress output is worth seeing (kind, rollout status) on the terminal.
fn on_terminal(what: &str, command: &mut Command) -> Result<()> {
    let status = cmd::status(command)?;
    ensure!(status.success(), "{what} failed ({status}); see above");
    Ok(())
}

/// Announces a step: most commands' output is captured, and a silent terminal looks like a hang.
fn step(what: &str) {
    println!("{what} ...");
}

fn print_how_to_try() {
    let kubectl = format!("kubectl --context kind-{CLUSTER}");
    println!(
        "\nproxy-agent serves the Services of kind cluster {CLUSTER}; there is no kube-proxy.\n\
         Try it (DNS works through the agent too: CoreDNS is itself behind a ClusterIP):\n\
         \n  {kubectl} run -it --rm client --image=busybox:1.36 --restart=Never -- \\\n      \
         wget -qO- http://kubia/hostname\n\
         \nkubia has ClientIP session affinity, so every request from one client reaches the same \
         pod;\nkubia-nodeport spreads them:\n\
         \n  {kubectl} run -it --rm client --image=busybox:1.36 --restart=Never -- \\\n      \
         sh -c 'for i in 1 2 3 4 5 6; do wget -qO- http://kubia-nodeport/hostname; echo; done'\n\
         \nWhat the agent programmed into its maps on one node:\n\
         \n  {kubectl} -n {NAMESPACE} exec {DAEMONSET} -- proxy-agent list\n\
         \nRemove the cluster with `cargo xtask run --delete`."
    );
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::DaemonSet;
    use k8s_openapi::api::core::v1::Container;
    use k8s_openapi::api::rbac::v1::ClusterRole;
    use serde_json::Value;

    use super::*;

    fn documents(name: &str) -> Vec<Value> {
        let path = deploy_file(name);
        let text = fs::read_to_string(&path).unwrap_or_else(|err| panic!("{path:?}: {err}"));
        serde_saphyr::from_multiple(&text).unwrap_or_else(|err| panic!("{path:?}: {err}"))
    }

    /// The one object of `kind` in deploy/agent.yaml, as its typed k8s-openapi struct: a field
    /// of the wrong type fails here rather than at `kubectl apply`.
    fn agent_object<T: serde::de::DeserializeOwned>(kind: &str) -> T {
        let mut objects = documents("agent.yaml")
            .into_iter()
            .filter(|object| object["kind"] == kind);
        let object = objects.next().unwrap_or_else(|| panic!("no {kind}"));
        assert!(objects.next().is_none(), "more than one {kind}");
        serde_json::from_value(object).unwrap_or_else(|err| panic!("{kind}: {err}"))
    }

    fn agent_container() -> (DaemonSet, Container) {
        let daemonset: DaemonSet = agent_object("DaemonSet");
        let pod = daemonset.spec.clone().unwrap().template.spec.unwrap();
        let container = pod
            .containers
            .into_iter()
            .find(|container| container.name == "proxy-agent")
            .expect("a proxy-agent container");
        (daemonset, container)
    }

    fn env_value(container: &Container, name: &str) -> Option<String> {
        let env = container.env.as_ref()?;
        env.iter().find(|var| var.name == name)?.value.clone()
    }

    #[test]
    fn daemonset_can_load_the_datapath_on_the_node() {
        let (daemonset, container) = agent_container();
        let pod = daemonset.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.host_network, Some(true));
        assert_eq!(container.image.as_deref(), Some(IMAGE));
        assert_eq!(container.image_pull_policy.as_deref(), Some("IfNotPresent"));
        assert_eq!(
            container.command.as_deref(),
            Some(&["proxy-agent".to_owned(), "run".to_owned()][..])
        );

        let security = container.security_context.as_ref().unwrap();
        let capabilities: Vec<&str> = security
            .capabilities
            .iter()
            .flat_map(|caps| caps.add.iter().flatten())
            .map(String::as_str)
            .collect();
        let privileged = security.privileged == Some(true);
        assert!(
            privileged
                || ["BPF", "NET_ADMIN", "SYS_ADMIN"]
                    .iter()
                    .all(|cap| capabilities.contains(cap)),
            "neither privileged nor CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN"
        );

        let mount = container
            .volume_mounts
            .iter()
            .flatten()
            .find(|mount| mount.mount_path == "/sys/fs/bpf")
            .expect("/sys/fs/bpf is mounted");
        // Pins must land on the node's bpffs to outlive the pod.
        assert_eq!(mount.mount_propagation.as_deref(), Some("Bidirectional"));
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|volume| volume.name == mount.name)
            .expect("the bpffs volume");
        let host_path = volume.host_path.as_ref().expect("a hostPath volume");
        assert_eq!(host_path.path, "/sys/fs/bpf");
        assert_eq!(host_path.type_.as_deref(), Some("DirectoryOrCreate"));
    }

    #[test]
    fn node_name_comes_from_the_downward_api() {
        let (_, container) = agent_container();
        let node_name = container
            .env
            .iter()
            .flatten()
            .find(|var| var.name == "NODE_NAME")
            .expect("NODE_NAME is set");
        let field = node_name.value_from.as_ref().unwrap().field_ref.as_ref();
        assert_eq!(
            field.map(|field| field.field_path.as_str()),
            Some("spec.nodeName")
        );
    }

    #[test]
    fn agent_reaches_the_api_server_of_this_cluster_without_a_service_proxy() {
        let (_, container) = agent_container();
        assert_eq!(
            env_value(&container, "KUBERNETES_SERVICE_HOST"),
            Some(format!("{CLUSTER}-control-plane"))
        );
        assert_eq!(
            env_value(&container, "KUBERNETES_SERVICE_PORT").as_deref(),
            Some("6443")
        );
    }

    #[test]
    fn daemonset_runs_everywhere_and_rolls_one_node_at_a_time() {
        let daemonset: DaemonSet = agent_object("DaemonSet");
        let spec = daemonset.spec.unwrap();
        let pod = spec.template.spec.unwrap();
        assert_eq!(
            pod.priority_class_name.as_deref(),
            Some("system-node-critical")
        );
        let tolerates_all = pod.tolerations.iter().flatten().any(|toleration| {
            toleration.operator.as_deref() == Some("Exists") && toleration.key.is_none()
        });
        assert!(
            tolerates_all,
            "a toleration of every taint (control plane included)"
        );
        let strategy = spec.update_strategy.unwrap();
        assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
        let rolling = strategy.rolling_update.unwrap();
        assert_eq!(
            rolling.max_unavailable,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
        );
    }

    #[test]
    fn cluster_role_lets_the_watchers_list_and_watch() {
        let role: ClusterRole = agent_object("ClusterRole");
        let rules = role.rules.unwrap_or_default();
        for (group, resource) in [
            ("", "services"),
            ("", "nodes"),
            ("discovery.k8s.io", "endpointslices"),
        ] {
            let has = |list: &[String], want: &str| list.iter().any(|item| item == want);
            let granted = |verb: &str| {
                rules.iter().any(|rule| {
                    has(rule.api_groups.as_deref().unwrap_or_default(), group)
                        && has(rule.resources.as_deref().unwrap_or_default(), resource)
                        && has(&rule.verbs, verb)
                })
            };
            for verb in ["get", "list", "watch"] {
                assert!(granted(verb), "{verb} on {resource} ({group:?})");
            }
        }
    }

    #[test]
    fn kind_cluster_has_no_kube_proxy_and_two_workers() {
        let [config] = &documents("kind.yaml")[..] else {
            panic!("one document")
        };
        assert_eq!(config["networking"]["kubeProxyMode"], "none");
        let roles: Vec<&Value> = config["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|node| &node["role"])
            .collect();
        assert_eq!(roles, ["control-plane", "worker", "worker"]);
    }

    #[test]
    fn demo_leaves_endpoints_and_cluster_ips_to_the_cluster() {
        let objects = documents("demo.yaml");
        let kinds: Vec<&str> = objects
            .iter()
            .map(|object| object["kind"].as_str().unwrap())
            .collect();
        assert!(!kinds.contains(&"EndpointSlice"));
        for object in objects.iter().filter(|object| object["kind"] == "Service") {
            assert!(
                object["spec"]["clusterIP"].is_null(),
                "{}",
                object["metadata"]
            );
        }
    }

    #[test]
    fn prerequisite_report_names_every_missing_tool() {
        let report = prerequisite_report(&[
            (
                Tool::DockerEngine,
                Some(Problem::Failing(
                    "Cannot connect to the Docker daemon".to_owned(),
                )),
            ),
            (Tool::Kind, Some(Problem::NotOnPath)),
            (Tool::Kubectl, Some(Problem::NotOnPath)),
        ])
        .expect("a report");
        for needle in [
            "a reachable Docker engine: `docker info` failed: Cannot connect to the Docker daemon",
            "kind on PATH: `kind` is not on PATH",
            "kubectl on PATH: `kubectl` is not on PATH",
            "Nothing was built or changed.",
        ] {
            assert!(report.contains(needle), "{needle:?} not in:\n{report}");
        }
    }

    #[test]
    fn prerequisite_report_names_only_what_is_missing() {
        let report = prerequisite_report(&[
            (Tool::DockerEngine, Some(Problem::NotOnPath)),
            (Tool::Kind, None),
            (Tool::Kubectl, None),
        ])
        .expect("a report");
        assert!(report.contains("`docker` is not on PATH"));
        assert!(!report.contains("kind on PATH"));
        assert!(!report.contains("kubectl on PATH"));

        let all_there = [Tool::DockerEngine, Tool::Kind, Tool::Kubectl].map(|tool| (tool, None));
        assert_eq!(prerequisite_report(&all_there), None);
    }

    #[test]
    fn agent_executable_is_read_from_cargo_messages() {
        let messages = [
            r#"{"reason":"compiler-artifact","target":{"name":"proxy-common"},"executable":null}"#,
            "not json",
            r#"{"reason":"compiler-artifact","target":{"name":"proxy-agent"},"executable":"/t/release/proxy-agent"}"#,
            r#"{"reason":"build-finished","success":true}"#,
        ]
        .join("\n");
        assert_eq!(
            agent_executable(&messages),
            Some(PathBuf::from("/t/release/proxy-agent"))
        );
    }

    #[test]
    fn an_unchanged_daemonset_is_told_from_a_configured_one() {
        assert!(daemonset_unchanged(
            "namespace/proxy-system unchanged\ndaemonset.apps/proxy-agent unchanged\n"
        ));
        assert!(!daemonset_unchanged(
            "namespace/proxy-system unchanged\ndaemonset.apps/proxy-agent configured\n"
        ));
    }
}
