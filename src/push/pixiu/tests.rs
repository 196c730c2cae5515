use envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
use prost::Message;

use super::*;

/// The example of `docs/protocol.md`.
pub(crate) const EXAMPLE: &str = r#"
static_resources:
  listeners:
    - name: net/http
      protocol_type: HTTP
      address:
        socket_address: { address: 0.0.0.0, port: 8888 }
      filter_chains:
        filters:
          - name: dgp.filter.httpconnectionmanager
            config:
              route_config:
                routes:
                  - match: { prefix: /user }
                    route: { cluster: user }
              http_filters:
                - name: dgp.filter.http.httpproxy
  clusters:
    - name: user
      lb_policy: RoundRobin
      endpoints:
        - id: 1
          socket_address: { address: 127.0.0.1, port: 1314 }
          meta: { zone: a }
    - name: user-eds
      type: EDS
      eds_cluster_config:
        eds_config:
          api_config_source: { api_type: GRPC, cluster_name: [xds-server] }
"#;

fn decode(resource: &Any) -> TypedExtensionConfig {
    TypedExtensionConfig::decode(resource.value.as_slice()).unwrap()
}

#[test]
fn parses_the_documented_example_into_the_two_resources() {
    let items = parse(EXAMPLE, Format::Yaml).unwrap();
    assert_eq!(items.len(), 3);
    let [(listener_name, listeners), (cluster_name, clusters)] = resources(items.iter());
    assert_eq!(listener_name.as_str(), LISTENER_RESOURCE);
    assert_eq!(cluster_name.as_str(), CLUSTER_RESOURCE);
    assert_eq!(listeners.type_url, ECDS_TYPE_URL);
    let listeners = decode(&listeners);
    assert_eq!(listeners.name, LISTENER_RESOURCE);
    let inner = listeners.typed_config.unwrap();
    assert_eq!(inner.type_url, LISTENERS_TYPE_URL);
    let listeners = api::PixiuExtensionListeners::decode(inner.value.as_slice()).unwrap();
    let listener = &listeners.listeners[0];
    assert_eq!(
        listener
            .address
            .as_ref()
            .unwrap()
            .socket_address
            .as_ref()
            .unwrap()
            .port,
        8888
    );
    let filter = &listener.filter_chain.as_ref().unwrap().filters[0];
    let Some(api::network_filter::Config::Struct(config)) = &filter.config else {
        panic!("struct config expected");
    };
    assert!(config.fields.contains_key("route_config"));
    let clusters = decode(&clusters).typed_config.unwrap();
    assert_eq!(clusters.type_url, CLUSTERS_TYPE_URL);
    let clusters = api::PixiuExtensionClusters::decode(clusters.value.as_slice()).unwrap();
    assert_eq!(
        clusters.clusters[0].type_str, "Static",
        "the default is explicit"
    );
    assert_eq!(clusters.clusters[0].endpoints[0].id, "1");
    assert_eq!(clusters.clusters[0].endpoints[0].metadata["zone"], "a");
    assert_eq!(clusters.clusters[1].r#type, 3);
    assert_eq!(
        clusters.clusters[1]
            .eds_cluster_config
            .as_ref()
            .unwrap()
            .eds_config
            .as_ref()
            .unwrap()
            .api_config_source
            .as_ref()
            .unwrap()
            .cluster_name,
        ["xds-server"]
    );
}

#[test]
fn same_files_give_the_same_bytes() {
    let once = resources(parse(EXAMPLE, Format::Yaml).unwrap().iter());
    for _ in 0..5 {
        assert_eq!(
            resources(parse(EXAMPLE, Format::Yaml).unwrap().iter()),
            once
        );
    }
}

fn refused(yaml: &str) -> ParseError {
    parse(yaml, Format::Yaml).unwrap_err()
}

#[test]
fn what_pixiu_cannot_take_is_refused_with_its_path() {
    let listener = |body: &str| format!("listeners:\n  - {{ {body} }}\n");
    let chain = "filter_chains: { filters: [ { name: dgp.filter.httpconnectionmanager } ] }";
    let address = "address: { socket_address: { address: 0.0.0.0, port: 80 } }";
    assert_eq!(refused(&listener(chain)).path, "listeners[0].address");
    assert_eq!(
        refused(&listener(address)).path,
        "listeners[0].filter_chains"
    );
    let e = refused(&listener(&format!(
        "{address}, filter_chains: {{ filters: [] }}"
    )));
    assert_eq!(e.path, "listeners[0].filter_chains.filters");
    let e = refused(&listener(&format!(
        "address: {{ socket_address: {{ address: 0.0.0.0, port: 70000 }} }}, {chain}"
    )));
    assert_eq!(e.path, "listeners[0].address.socket_address.port");
    let e = refused(&listener(&format!(
        "{address}, {chain}, protocol_type: SMTP"
    )));
    assert_eq!(e.path, "listeners[0].protocol_type");
    let e = refused(&listener(&format!(
        "{address}, filter_chains: {{ filters: [ {{ name: {HTTP_CONNECTION_MANAGER}, config: {{ route_config: {{ routes: [ {{ route: {{ cluster: \" \" }} }} ] }} }} }} ] }}"
    )));
    assert!(e.path.ends_with("routes[0].route.cluster"), "{e}");
    let two = format!(
        "listeners:\n  - {{ name: a, {address}, {chain} }}\n  - {{ name: b, {address}, {chain} }}\n"
    );
    assert!(refused(&two).message.contains("duplicate listener address"));

    let cluster = |body: &str| format!("clusters:\n  - {{ name: c, {body} }}\n");
    assert_eq!(
        refused(&cluster("type: \"Static \"")).path,
        "clusters[0].type"
    );
    assert_eq!(
        refused(&cluster("lb_policy: Fastest")).path,
        "clusters[0].lb_policy"
    );
    assert_eq!(
        refused(&cluster("type: EDS")).path,
        "clusters[0].eds_cluster_config"
    );
    let e = refused(&cluster(
        "type: EDS, eds_cluster_config: { eds_config: { path: x } }",
    ));
    assert_eq!(
        e.path,
        "clusters[0].eds_cluster_config.eds_config.api_config_source"
    );
    let e = refused(&cluster(
        "eds_cluster_config: { eds_config: { api_config_source: { api_type: GRPC } } }",
    ));
    assert!(e.path.ends_with("api_config_source.cluster_name"), "{e}");
    let endpoint = "{ socket_address: { address: 10.0.0.1, port: 20000 } }";
    let e = refused(&cluster(&format!("endpoints: [ {endpoint}, {endpoint} ]")));
    assert!(e.message.contains("duplicate endpoint"), "{e}");
    assert!(
        refused(&cluster("health_checks: []"))
            .message
            .contains("health_checks")
    );
    let twice = "clusters:\n  - { name: c }\n  - { name: c }\n";
    assert!(refused(twice).message.contains("duplicate cluster name"));
    assert!(parse("", Format::Yaml).unwrap().is_empty());
}

#[test]
fn clashes_across_files_refuse_the_set_and_an_emptied_dir_serves_empty_sets() {
    let dir = tempfile::tempdir().unwrap();
    let mut loader = DirLoader::<PixiuParser>::new(dir.path());
    assert!(loader.scan(), "the first listing counts as a change");
    let Update::ReplaceType { resources, .. } = update(&loader).unwrap() else {
        panic!("a replace");
    };
    assert_eq!(
        resources.len(),
        2,
        "both resources exist for an empty directory"
    );
    std::fs::write(dir.path().join("a.yaml"), "clusters: [ { name: c } ]").unwrap();
    std::fs::write(dir.path().join("b.yaml"), "clusters: [ { name: c } ]").unwrap();
    assert!(loader.scan());
    let e = update(&loader).unwrap_err();
    assert!(
        e.message.contains("a.yaml") && e.message.contains("b.yaml"),
        "{e}"
    );
    let mut missing = DirLoader::<PixiuParser>::new(dir.path().join("missing"));
    assert!(!missing.listed());
    // Polled while missing: nothing changes, and the reason is kept (warned once).
    assert!(!missing.scan());
    assert!(!missing.scan());
    assert!(
        missing
            .unlisted()
            .is_some_and(|why| why.contains("No such file"))
    );
    std::fs::create_dir(dir.path().join("missing")).unwrap();
    assert!(missing.scan(), "the first listing is a change");
    assert!(missing.listed() && missing.unlisted().is_none());
}

#[tokio::test]
async fn start_publishes_and_refuses_a_bad_change() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pixiu.yaml"), EXAMPLE).unwrap();
    let (cache, writer) = pixiu_xds::cache();
    let shutdown = CancellationToken::new();
    let config = PixiuConfig {
        config_dir: Some(dir.path().to_path_buf()),
        poll_interval: Duration::from_millis(20),
    };
    let task = start(&config, writer, shutdown.clone()).unwrap();
    let view = pixiu_xds::View::new([Partition::new(PIXIU_PARTITION)]);
    let ecds = TypeUrl::new(ECDS_TYPE_URL);
    let before = cache
        .snapshot()
        .get(&view, &ecds, CLUSTER_RESOURCE)
        .unwrap()
        .clone();
    let mut changes = cache.changes();
    std::fs::write(
        dir.path().join("pixiu.yaml"),
        "clusters: [ { name: c, type: Nope } ]",
    )
    .unwrap();
    std::fs::write(dir.path().join("other.yaml"), "clusters: [ { name: d } ]").unwrap();
    let snapshot = tokio::time::timeout(Duration::from_secs(5), changes.next())
        .await
        .unwrap()
        .unwrap();
    let after = snapshot.get(&view, &ecds, CLUSTER_RESOURCE).unwrap();
    assert_ne!(after.version, before.version, "other.yaml was added");
    let clusters = decode(&after.body()).typed_config.unwrap();
    let clusters = api::PixiuExtensionClusters::decode(clusters.value.as_slice()).unwrap();
    let names: Vec<_> = clusters.clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["d", "user", "user-eds"],
        "the bad file kept its previous content"
    );
    shutdown.cancel();
    task.await.unwrap();
}
