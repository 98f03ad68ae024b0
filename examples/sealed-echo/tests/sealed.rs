//! The sealed-echo example against an in-process reeve (issue 15, item 7: "service endpoints
//! can use it"): a service reaches another over TLS pinned to the public key the other
//! registered, and refuses a server that proves any other key, or an entry without a key.

mod common;

use common::{call, hex, reeve, serve, DEADLINE};
use crux_reeve::endpoint::{Dialer, EndpointError, NodeIdentity};
use sealed_echo::pb::{echo_client::EchoClient, SayRequest};

#[tokio::test]
async fn a_client_gets_the_answer_over_tls_pinned_to_the_registered_key() {
    let dir = tempfile::tempdir().unwrap();
    let r = reeve(dir.path()).await;
    let socket = r.socket.to_str().unwrap();
    let key_file = dir.path().join("echo.key");
    let server = serve(&["--socket", socket, "--key-file", key_file.to_str().unwrap()]).await;

    // The registry holds the key the server serves with.
    let live = r.live("echo1");
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0].addr, server.addr);
    assert_eq!(hex(&live[0].public_key), server.key);

    let out = call(&["--socket", socket, "hello over tls"]).await;
    assert!(out.ok, "call failed: {}", out.stderr);
    let mut lines = out.stdout.lines();
    assert_eq!(lines.next(), Some("hello over tls"));
    let how = lines.next().unwrap_or_default();
    assert!(how.starts_with("from echo1_1 at "), "{how}");
    assert!(how.contains(&format!("key={}", server.key)), "{how}");
    assert!(how.contains("over TLS13_"), "{how}");

    // The port speaks nothing but TLS: a cleartext gRPC call gets no answer.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect_timeout(DEADLINE)
        .timeout(DEADLINE)
        .connect()
        .await;
    if let Ok(channel) = plain {
        let r = EchoClient::new(channel)
            .say(SayRequest {
                text: "in clear".into(),
            })
            .await;
        assert!(r.is_err(), "a cleartext call was answered: {r:?}");
    }
}

#[tokio::test]
async fn a_server_presenting_another_key_than_the_registered_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = reeve(dir.path()).await;
    let socket = r.socket.to_str().unwrap();
    // An impostor serves at an address the registry gives for echo1, but with its own key: the
    // registered key belongs to someone else.
    let key_file = dir.path().join("impostor.key");
    let server = serve(&["--no-register", "--key-file", key_file.to_str().unwrap()]).await;
    let registered = NodeIdentity::generate().unwrap().public();
    r.register("echo1", "echo1_1", &server.addr, registered.0.to_vec());

    let out = call(&["--socket", socket, "secret"]).await;
    assert!(!out.ok, "the impostor was called: {}", out.stdout);
    assert!(!out.stdout.contains("secret"), "{}", out.stdout);
    let why = out.stderr;
    assert!(
        why.contains(&format!("presented key {}", &server.key[..16]))
            && why.contains(&format!("registry lists {registered}"))
            && why.contains("refused"),
        "{why}"
    );

    // The library says the same, typed.
    match Dialer::new(&r.socket).channel("echo1").await {
        Err(EndpointError::KeyMismatch {
            presented,
            registered: listed,
            inst,
            ..
        }) => {
            assert_eq!(hex(&presented.0), server.key);
            assert_eq!(listed, registered);
            assert_eq!(inst, "echo1_1");
        }
        other => panic!("expected a key mismatch, got {other:?}"),
    }
}

#[tokio::test]
async fn an_instance_registered_without_a_key_is_not_dialled() {
    let dir = tempfile::tempdir().unwrap();
    let r = reeve(dir.path()).await;
    let socket = r.socket.to_str().unwrap();
    let key_file = dir.path().join("echo.key");
    let server = serve(&["--no-register", "--key-file", key_file.to_str().unwrap()]).await;
    r.register("echo1", "echo1_1", &server.addr, Vec::new());

    let out = call(&["--socket", socket, "hello"]).await;
    assert!(!out.ok, "called without a key: {}", out.stdout);
    assert!(
        out.stderr.contains("echo1_1") && out.stderr.contains("registered no public key"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn a_server_that_names_its_clients_keys_answers_only_them() {
    let dir = tempfile::tempdir().unwrap();
    let r = reeve(dir.path()).await;
    let socket = r.socket.to_str().unwrap();
    let client_file = dir.path().join("client.key");
    let client = NodeIdentity::load_or_create(&client_file).unwrap().public();
    let key_file = dir.path().join("echo.key");
    let _server = serve(&[
        "--socket",
        socket,
        "--key-file",
        key_file.to_str().unwrap(),
        "--clients",
        &hex(&client.0),
    ])
    .await;

    let out = call(&[
        "--socket",
        socket,
        "--key-file",
        client_file.to_str().unwrap(),
        "it is me",
    ])
    .await;
    assert!(out.ok, "the named client was refused: {}", out.stderr);
    assert!(
        out.stdout.contains(&format!("as caller {client}")),
        "{}",
        out.stdout
    );

    let stranger = dir.path().join("stranger.key");
    let out = call(&[
        "--socket",
        socket,
        "--key-file",
        stranger.to_str().unwrap(),
        "let me in",
    ])
    .await;
    assert!(!out.ok, "a stranger was answered: {}", out.stdout);
    let out = call(&["--socket", socket, "anonymous"]).await;
    assert!(!out.ok, "an anonymous client was answered: {}", out.stdout);
}

#[tokio::test]
async fn a_sealed_channel_reconnects_to_the_best_instance_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let r = reeve(dir.path()).await;
    let socket = r.socket.to_str().unwrap();
    let first_key = dir.path().join("first.key");
    let mut first = serve(&[
        "--socket",
        socket,
        "--key-file",
        first_key.to_str().unwrap(),
    ])
    .await;
    let sealed = Dialer::new(&r.socket).channel("echo1").await.unwrap();
    let mut client = EchoClient::new(sealed.channel());
    let say = |text: &str| SayRequest { text: text.into() };
    assert_eq!(
        client.say(say("one")).await.unwrap().into_inner().inst,
        "echo1_1"
    );

    // A better instance with another key appears, and the first one dies: the channel's next
    // connection goes to the new best, pinned to the new key.
    let second_key = dir.path().join("second.key");
    let second = serve(&[
        "--socket",
        socket,
        "--key-file",
        second_key.to_str().unwrap(),
        "--inst",
        "echo1_2",
    ])
    .await;
    first.child.kill().await.unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let reply = loop {
        // The call on the dead connection fails; tonic reconnects at a later one.
        if let Ok(r) = client.say(say("two")).await {
            break r.into_inner();
        }
        assert!(tokio::time::Instant::now() < deadline, "never reconnected");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!(reply.inst, "echo1_2");
    assert_eq!(sealed.connection().instance.inst, "echo1_2");
    assert_eq!(hex(&sealed.connection().key.0), second.key);
}
